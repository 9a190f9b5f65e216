package logshipper

import (
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"strconv"
	"time"

	"github.com/fluent/fluent-logger-golang/fluent"
	"github.com/tinylib/msgp/msgp"
)

// partial marks one piece of a line longer than LOGSHIP_MAX_LINE_BYTES, with the
// field names Docker and Fluent Bit's multiline filter already understand.
type partial struct {
	id      string
	ordinal int
	last    bool
}

// record is one log record before encoding.
type record struct {
	t       time.Time
	line    []byte
	file    string
	partial *partial
}

// encoder appends records to the body of the next batch: msgpack entries for
// PackedForward, or JSON lines for LOGSHIP_OUTPUT=stdout.
type encoder struct {
	pod, namespace string
	labels         func() map[string]string
	parseJSON      bool
	jsonOut        bool

	buf       []byte
	records   int
	lineBytes int
	batchLbl  map[string]string
}

func (e *encoder) empty() bool { return e.records == 0 }

func (e *encoder) add(r *record) {
	if e.records == 0 && e.labels != nil {
		// Once per batch: labels change rarely and the reader may be a remote cache.
		e.batchLbl = e.labels()
	}
	e.records++
	e.lineBytes += len(r.line)
	var obj map[string]any
	if e.parseJSON {
		obj = parseObject(r.line)
	}
	if e.jsonOut {
		e.addJSON(r, obj)
		return
	}
	b := msgp.AppendArrayHeader(e.buf, 2)
	et := fluent.EventTime(r.t)
	b, _ = msgp.AppendExtension(b, &et) // fixed-size, cannot fail
	if obj != nil {
		e.fill(obj, r)
		b, _ = msgp.AppendMapStrIntf(b, obj) // values come from encoding/json: all encodable
		e.buf = b
		return
	}
	e.buf = e.appendFields(b, r)
}

// appendFields appends the record of a line that is not a JSON object: the
// map is written directly, without building one, as this is the hot path.
func (e *encoder) appendFields(b []byte, r *record) []byte {
	n := uint32(2)
	if e.pod != "" {
		n++
	}
	if e.namespace != "" {
		n++
	}
	if len(e.batchLbl) > 0 {
		n++
	}
	if r.partial != nil {
		n += 4
	}
	b = msgp.AppendMapHeader(b, n)
	b = msgp.AppendString(b, "log")
	b = msgp.AppendStringFromBytes(b, r.line)
	b = msgp.AppendString(b, "file")
	b = msgp.AppendString(b, r.file)
	if e.pod != "" {
		b = msgp.AppendString(b, "pod")
		b = msgp.AppendString(b, e.pod)
	}
	if e.namespace != "" {
		b = msgp.AppendString(b, "namespace")
		b = msgp.AppendString(b, e.namespace)
	}
	if len(e.batchLbl) > 0 {
		b = msgp.AppendString(b, "labels")
		b = msgp.AppendMapHeader(b, uint32(len(e.batchLbl)))
		for k, v := range e.batchLbl {
			b = msgp.AppendString(b, k)
			b = msgp.AppendString(b, v)
		}
	}
	if p := r.partial; p != nil {
		b = msgp.AppendString(b, "partial_message")
		b = msgp.AppendBool(b, true)
		b = msgp.AppendString(b, "partial_id")
		b = msgp.AppendString(b, p.id)
		b = msgp.AppendString(b, "partial_ordinal")
		b = msgp.AppendInt(b, p.ordinal)
		b = msgp.AppendString(b, "partial_last")
		b = msgp.AppendBool(b, p.last)
	}
	return b
}

// fill sets the shipper's own fields on a record; they win over the line's
// fields of the same name so every record can be traced to its Pod and file.
func (e *encoder) fill(obj map[string]any, r *record) {
	if obj["log"] == nil && r.partial != nil {
		obj["log"] = string(r.line)
	}
	obj["file"] = r.file
	if e.pod != "" {
		obj["pod"] = e.pod
	}
	if e.namespace != "" {
		obj["namespace"] = e.namespace
	}
	if len(e.batchLbl) > 0 {
		l := make(map[string]any, len(e.batchLbl))
		for k, v := range e.batchLbl {
			l[k] = v
		}
		obj["labels"] = l
	}
	if p := r.partial; p != nil {
		obj["partial_message"], obj["partial_id"], obj["partial_ordinal"], obj["partial_last"] = true, p.id, int64(p.ordinal), p.last
	}
}

func (e *encoder) addJSON(r *record, obj map[string]any) {
	if obj == nil {
		obj = map[string]any{"log": string(r.line)}
	}
	e.fill(obj, r)
	obj["time"] = r.t.UTC().Format(time.RFC3339Nano)
	b, err := json.Marshal(obj)
	if err != nil {
		b, _ = json.Marshal(map[string]any{"log": string(r.line), "file": r.file, "time": obj["time"]})
	}
	e.buf = append(append(e.buf, b...), '\n')
}

// frame ends the batch: the whole PackedForward message (or the JSON lines) and
// resets the encoder.
func (e *encoder) frame(tag, chunk string, gz bool) ([]byte, error) {
	defer func() { e.buf, e.records, e.lineBytes, e.batchLbl = e.buf[:0], 0, 0, nil }()
	if e.jsonOut {
		return bytes.Clone(e.buf), nil
	}
	entries := e.buf
	if gz {
		var zb bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&zb, gzip.BestSpeed)
		if _, err := zw.Write(entries); err != nil {
			return nil, err
		}
		if err := zw.Close(); err != nil {
			return nil, err
		}
		entries = zb.Bytes()
	}
	opts := uint32(1)
	if chunk != "" {
		opts++
	}
	if gz {
		opts++
	}
	out := make([]byte, 0, len(entries)+len(tag)+96)
	out = msgp.AppendArrayHeader(out, 3)
	out = msgp.AppendString(out, tag)
	out = msgp.AppendBytes(out, entries)
	out = msgp.AppendMapHeader(out, opts)
	out = msgp.AppendString(out, "size")
	out = msgp.AppendInt(out, e.records)
	if chunk != "" {
		out = msgp.AppendString(out, "chunk")
		out = msgp.AppendString(out, chunk)
	}
	if gz {
		out = msgp.AppendString(out, "compressed")
		out = msgp.AppendString(out, "gzip")
	}
	return out, nil
}

func newChunkID() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// parseObject returns the line as a map when it is a JSON object, else nil.
func parseObject(line []byte) map[string]any {
	t := bytes.TrimSpace(line)
	if len(t) < 2 || t[0] != '{' {
		return nil
	}
	d := json.NewDecoder(bytes.NewReader(t))
	d.UseNumber()
	var obj map[string]any
	if err := d.Decode(&obj); err != nil || d.More() {
		return nil
	}
	return fixNumbers(obj).(map[string]any)
}

// fixNumbers turns json.Number into int64 or float64, which msgpack encodes
// natively (large integers keep their precision).
func fixNumbers(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			x[k] = fixNumbers(e)
		}
		return x
	case []any:
		for i, e := range x {
			x[i] = fixNumbers(e)
		}
		return x
	case json.Number:
		if i, err := strconv.ParseInt(string(x), 10, 64); err == nil {
			return i
		}
		f, _ := x.Float64()
		return f
	}
	return v
}
