package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/file"
)

// streamCase is a prefix: a checkpoint (nil: none; unsorted: its files
// written in reverse path order) and batches after it.
type streamCase struct {
	cp       []snapshot.File
	unsorted bool
	batches  []*Batch
}

var cpWriter = snapshot.Writer{Pod: "cp", Namespace: "ns"}

func (c streamCase) store(t *testing.T) store.Store {
	t.Helper()
	st, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if c.cp != nil {
		files := c.cp
		if c.unsorted {
			files = slices.Clone(files)
			slices.Reverse(files)
		}
		m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(base, ""), Created: base, Writer: cpWriter, Files: files}
		if _, err := snapshot.Write(ctx, st, m); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range c.batches {
		if _, err := Append(ctx, st, b); err != nil {
			t.Fatal(err)
		}
	}
	return st
}

func object(t *testing.T, st store.Store, id string) []byte {
	t.Helper()
	rc, _, err := st.Get(context.Background(), snapshot.Key(id, true), store.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// check writes the checkpoint of c streamed and in memory, on two copies of
// the prefix, and wants the same bytes, and the files of the plain map fold.
func (c streamCase) check(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	horizon := base.Add(time.Hour)
	a, b := c.store(t), c.store(t)
	idA, errA := checkpointStreamed(ctx, a, horizon, snapshot.Writer{Pod: "w"})
	if c.unsorted {
		if !errors.Is(errA, ErrUnstreamable) {
			t.Fatalf("unsorted checkpoint: %v", errA)
		}
		idA, errA = Checkpoint(ctx, a, horizon.Add(Margin), 0, snapshot.Writer{Pod: "w"})
	}
	idB, errB := checkpointInMemory(ctx, b, horizon, snapshot.Writer{Pod: "w"})
	if errA != nil || errB != nil || idA != idB {
		t.Fatalf("streamed %q %v, in memory %q %v", idA, errA, idB, errB)
	}
	if idA == "" {
		return
	}
	ga, gb := object(t, a, idA), object(t, b, idB)
	if !bytes.Equal(ga, gb) {
		ma, _ := snapshot.Decode(bytes.NewReader(ga))
		mb, _ := snapshot.Decode(bytes.NewReader(gb))
		t.Fatalf("streamed checkpoint differs:\n%+v\nin memory:\n%+v", ma, mb)
	}
	m, err := snapshot.Decode(bytes.NewReader(ga))
	if err != nil {
		t.Fatal(err)
	}
	want := refFold(c.cp, Writer{Namespace: cpWriter.Namespace, Pod: cpWriter.Pod}.ID(), c.batches)
	if !slices.EqualFunc(m.Files, want, sameFile) {
		t.Fatalf("streamed checkpoint:\n%v\nwant\n%v", m.Files, want)
	}
}

// The checkpoint written from the streamed fold is byte for byte the one
// the in-memory fold writes, over random checkpoints and tails with
// file/directory clashes, ties, mtimes in other zones, no checkpoint, and an
// unsorted checkpoint (which falls back to memory).
func TestStreamedCheckpointMatchesInMemory(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	names := []string{"a", "a-1", "a/b", "a/c", "a/b/c", "b", "b/x", "b/x/y", "c.txt", "d/e/f", "d/e", "d.e", "z", "é"}
	zones := []*time.Location{time.UTC, time.FixedZone("plus2", 2*3600), time.FixedZone("minus5", -5*3600)}
	at := func() time.Time {
		return base.Add(time.Duration(r.IntN(6)) * time.Second).In(zones[r.IntN(len(zones))])
	}
	for i := range 80 {
		var c streamCase
		if i%10 != 0 {
			var files []snapshot.File
			for _, p := range names {
				if r.IntN(2) == 0 {
					f := write(p, at(), fmt.Sprint(r.IntN(3))).File
					f.ETag = []string{"", `"0123456789abcdef0123456789abcdef"`, `"x-2"`}[r.IntN(3)]
					files = append(files, f)
				}
			}
			c.cp = refFold(files, "", nil) // a valid checkpoint: no file/dir pair
			if c.cp == nil {
				c.cp = []snapshot.File{}
			}
			c.unsorted = i%7 == 3 && len(c.cp) > 1
		}
		for j := range 1 + r.IntN(4) {
			b := &Batch{Writer: []Writer{wa, wb}[j%2], Time: base.Add(time.Duration(j+1) * time.Second)}
			for _, p := range names {
				switch r.IntN(4) {
				case 0:
					b.Changes = append(b.Changes, write(p, at(), fmt.Sprint(r.IntN(3))))
				case 1:
					b.Changes = append(b.Changes, del(p, at()))
				}
			}
			c.batches = append(c.batches, b)
		}
		t.Run(fmt.Sprint(i), c.check)
	}
}

// A large checkpoint (the upload is measured, then streamed) with a tail
// that leaves files out: same bytes as the in-memory fold.
func TestStreamedCheckpointLarge(t *testing.T) {
	var c streamCase
	for i := range 20_000 {
		c.cp = append(c.cp, write(fmt.Sprintf("d%02d/%05d", i/1000, i), base.Add(-time.Duration(i)), "c").File)
	}
	c.cp = refFold(c.cp, "", nil)
	c.batches = []*Batch{{Writer: wa, Time: base.Add(time.Second), Changes: []Change{
		write("d03", base, "1"),                      // a file over a directory of the checkpoint: left out
		write("d05/00001/x", base, "2"),              // under a file of the checkpoint: that file is left out
		write("d07/07000", base.Add(time.Hour), "3"), // replaces
		del("d08/08000", base.Add(time.Hour)),
		write("new/a", base, "4"),
	}}}
	c.check(t)
}

// Scan hands out what DecodeCompact indexes; a streamed fold of a store
// whose checkpoint changes between its walks stores nothing.
func TestScanFold(t *testing.T) {
	c := streamCase{cp: []snapshot.File{write("a", base, "1").File, write("b/c", base, "2").File},
		batches: []*Batch{{Writer: wa, Time: base.Add(time.Second), Changes: []Change{del("a", base.Add(time.Hour)), write("b/d", base, "3")}}}}
	st := c.store(t)
	var got []string
	err := ScanFold(context.Background(), st, time.Time{}, func(p string, e Entry) error {
		got = append(got, fmt.Sprintf("%s:%v", p, e.Deleted))
		return nil
	})
	if err != nil || strings.Join(got, " ") != "a:true b/c:false b/d:false" {
		t.Fatalf("ScanFold: %v %v", got, err)
	}
}
