package snapshot

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"iter"
	"reflect"
	"slices"
	"strings"
	"time"
	"unsafe"
)

// Index is the files of a validated manifest in compact form, in path order:
// what an agent holds for a checkpoint of a million files. A []File costs
// about 260 bytes per entry (a File struct, three strings with their headers,
// a time.Time with its location pointer); an Index entry is a fixed 56-byte
// record (sha256 as 32 bytes, size and mode packed in one word, mtime as Unix
// nanoseconds, a directory id, an arena position) plus its base name, ETag
// (16 bytes when it is the usual quoted MD5), version id and an id of the
// fields this version does not store itself, all in 1 MiB arena chunks: about
// 90 bytes for a path like uploads/2026/11/0000001.jpg. Chunks, not one
// growing slice, so a million entries never need a second copy while
// appending. Directories are interned (one string per directory, not per
// file). Records keep the order they were added in; order (nil when that is
// already path order, the usual case) is the path order.
//
// An Index is read-only once built, except by the fold (changelog.State),
// which appends the tail's records to its base and sets a new order.
type Index struct {
	recs   [][]rec
	arena  [][]byte
	nrec   int
	dirs   []string
	extras []File // templates of the extra fields; extras[0] has none
	order  []int32
	cost   int64
}

type rec struct {
	sha   [32]byte
	sm    uint64 // size | mode<<modeShift | flags<<flagShift
	mtime int64  // Unix ns (flagWideTime: in the arena)
	dir   uint32
	off   uint32 // arena chunk<<arenaShift | offset
}

// RecordBytes is the fixed size of one entry of an Index.
const RecordBytes = int(unsafe.Sizeof(rec{}))

const (
	recShift     = 12
	recChunk     = 1 << recShift
	arenaShift   = 20
	arenaChunk   = 1 << arenaShift
	maxArenaPos  = 1 << 32
	modeShift    = 43 // 2^43 bytes = 8 TiB > MaxFileSize
	flagShift    = 52
	flagETagMD5  = 1 // ETag `"` + 32 hex + `"`, stored as 16 bytes
	flagWideTime = 2 // mtime outside int64 ns: varint seconds, uvarint ns in the arena
	// internCost is what a map entry and a slice slot cost for an interned
	// directory or extra-fields template, beside its bytes.
	internCost = 96
)

// Len is the number of files.
func (x *Index) Len() int {
	if x == nil {
		return 0
	}
	if x.order != nil {
		return len(x.order)
	}
	return x.nrec
}

// Cost is the bytes the index was charged against the memory budget.
func (x *Index) Cost() int64 { return x.cost }

func (x *Index) rec(i int) *rec {
	if x.order != nil {
		i = int(x.order[i])
	}
	return &x.recs[i>>recShift][i&(recChunk-1)]
}

// item returns the arena bytes of r (from its start to the chunk's end).
func (x *Index) item(r *rec) []byte {
	return x.arena[r.off>>arenaShift][r.off&(arenaChunk-1):]
}

func (x *Index) name(r *rec) []byte {
	b := x.item(r)
	n, k := binary.Uvarint(b)
	return b[k : k+int(n)]
}

// Path is the path of the i-th file in path order.
func (x *Index) Path(i int) string {
	r := x.rec(i)
	return joinPath(x.dirs[r.dir], x.name(r))
}

func joinPath(dir string, name []byte) string {
	if dir == "" {
		return string(name)
	}
	return dir + "/" + string(name)
}

// comparePath compares the path of r with p without building it.
func (x *Index) comparePath(r *rec, p string) int {
	dir, name := x.dirs[r.dir], bstr(x.name(r))
	if dir == "" {
		return strings.Compare(name, p)
	}
	if len(dir) >= len(p) {
		if c := strings.Compare(dir[:len(p)], p); c != 0 {
			return c
		}
		return 1 // p is a prefix of the path
	}
	if c := strings.Compare(dir, p[:len(dir)]); c != 0 {
		return c
	}
	if c := int('/') - int(p[len(dir)]); c != 0 {
		return c
	}
	return strings.Compare(name, p[len(dir)+1:])
}

// bstr views b as a string for a comparison (never kept).
func bstr(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

// Size is the size of the i-th file.
func (x *Index) Size(i int) int64 { return int64(x.rec(i).sm & (1<<modeShift - 1)) }

// SHA256 is the sha256 of the i-th file, without materializing it.
func (x *Index) SHA256(i int) [32]byte { return x.rec(i).sha }

// At is the i-th file in path order.
func (x *Index) At(i int) File {
	r := x.rec(i)
	b := x.item(r)
	n, k := binary.Uvarint(b)
	name := b[k : k+int(n)]
	b = b[k+int(n):]
	flags := r.sm >> flagShift
	var etag string
	if flags&flagETagMD5 != 0 {
		etag = `"` + hex.EncodeToString(b[:16]) + `"`
		b = b[16:]
	} else {
		etag, b = uvarString(b)
	}
	vid, b := uvarString(b)
	extra, k := binary.Uvarint(b)
	b = b[k:]
	mt := time.Unix(0, r.mtime).UTC()
	if flags&flagWideTime != 0 {
		sec, k := binary.Varint(b)
		ns, _ := binary.Uvarint(b[k:])
		mt = time.Unix(sec, int64(ns)).UTC()
	}
	f := x.extras[extra]
	f.Path = joinPath(x.dirs[r.dir], name)
	f.Size = int64(r.sm & (1<<modeShift - 1))
	f.SHA256 = hex.EncodeToString(r.sha[:])
	f.MTime = mt
	f.Mode = Mode(r.sm >> modeShift & 0o777)
	f.ETag, f.VersionID = etag, vid
	return f
}

func uvarString(b []byte) (string, []byte) {
	n, k := binary.Uvarint(b)
	return string(b[k : k+int(n)]), b[k+int(n):]
}

// Find returns the position of path p, and whether it is listed.
func (x *Index) Find(p string) (int, bool) {
	n := x.Len()
	lo, hi := 0, n
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if x.comparePath(x.rec(m), p) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo, lo < n && x.comparePath(x.rec(lo), p) == 0
}

// All yields the files in path order.
func (x *Index) All() iter.Seq2[int, File] {
	return func(yield func(int, File) bool) {
		for i := range x.Len() {
			if !yield(i, x.At(i)) {
				return
			}
		}
	}
}

// Files materializes the files (small manifests, tests).
func (x *Index) Files() []File {
	out := make([]File, 0, x.Len())
	for _, f := range x.All() {
		out = append(out, f)
	}
	return out
}

// Builder appends files to an Index, charging each against a memory budget.
type Builder struct {
	x        *Index
	dirIDs   map[string]uint32
	extraIDs map[string]uint32
	budget   int64
	max      int // entries
	sorted   bool
	last     []byte
	tmp      []byte
	// dry: only charge the entries (Meter); directories are then known by
	// a hash of their name.
	dry     bool
	dirHash map[uint64]struct{}
	seed    maphash.Seed
}

// NewBuilder starts an empty index whose entries may cost up to BudgetBytes
// and number up to MaxEntries (this process's memory limit).
func NewBuilder() *Builder { return newBuilder(BudgetBytes(), MaxEntries()) }

func newBuilder(budget int64, maxEntries int) *Builder {
	return &Builder{x: &Index{dirs: []string{""}, extras: []File{{}}}, dirIDs: map[string]uint32{"": 0},
		extraIDs: map[string]uint32{"": 0}, budget: budget, max: maxEntries, sorted: true}
}

// ErrBudget marks a manifest refused for this agent's memory budget.
var ErrBudget = errors.New("over this agent's memory budget")

// Add validates f and appends it.
func (b *Builder) Add(f File) error {
	if err := f.validate(); err != nil {
		return fmt.Errorf("file %d %q: %w", b.x.nrec, f.Path, err)
	}
	return b.add(f)
}

// add appends f, which passed validate.
func (b *Builder) add(f File) error {
	x := b.x
	if x.nrec >= b.max {
		return fmt.Errorf("more than %d files: %w (%s)", b.max, ErrBudget, budgetSource())
	}
	if !b.dry {
		if b.sorted && len(b.last) > 0 && strings.Compare(bstr(b.last), f.Path) > 0 {
			b.sorted = false
		}
		b.last = append(b.last[:0], f.Path...)
	}
	dir, name := "", f.Path
	if i := strings.LastIndexByte(f.Path, '/'); i >= 0 {
		dir, name = f.Path[:i], f.Path[i+1:]
	}
	cost := int64(RecordBytes + 8) // the record and a slot of order (or of an agent's plan)
	var d uint32
	if b.dry {
		h := maphash.String(b.seed, dir)
		if _, ok := b.dirHash[h]; !ok {
			b.dirHash[h] = struct{}{}
			cost += int64(len(dir)) + internCost
		}
	} else if id, ok := b.dirIDs[dir]; ok {
		d = id
	} else {
		d = uint32(len(x.dirs))
		b.dirIDs[dir] = d
		x.dirs = append(x.dirs, dir)
		cost += int64(len(dir)) + internCost
	}
	var r rec
	var flags uint64
	it := binary.AppendUvarint(b.tmp[:0], uint64(len(name)))
	it = append(it, name...)
	if md5, ok := etagMD5(f.ETag); ok {
		flags |= flagETagMD5
		it = append(it, md5[:]...)
	} else {
		it = binary.AppendUvarint(it, uint64(len(f.ETag)))
		it = append(it, f.ETag...)
	}
	it = binary.AppendUvarint(it, uint64(len(f.VersionID)))
	it = append(it, f.VersionID...)
	extra, err := b.extra(f, &cost)
	if err != nil {
		return err
	}
	it = binary.AppendUvarint(it, uint64(extra))
	if sec := f.MTime.Unix(); sec > -9e9 && sec < 9e9 {
		r.mtime = f.MTime.UnixNano()
	} else {
		flags |= flagWideTime
		it = binary.AppendVarint(it, sec)
		it = binary.AppendUvarint(it, uint64(f.MTime.Nanosecond()))
	}
	b.tmp = it
	cost += int64(len(it))
	if x.cost+cost > b.budget {
		return fmt.Errorf("%d files need more than %d bytes: %w (%s)", x.nrec+1, b.budget, ErrBudget, budgetSource())
	}
	if b.dry {
		x.nrec++
		x.cost += cost
		return nil
	}
	off, err := x.put(it)
	if err != nil {
		return err
	}
	hex.Decode(r.sha[:], []byte(f.SHA256))
	r.sm = uint64(f.Size) | uint64(f.Mode&0o777)<<modeShift | flags<<flagShift
	r.dir, r.off = d, off
	if x.nrec&(recChunk-1) == 0 {
		x.recs = append(x.recs, make([]rec, 0, recChunk))
	}
	c := &x.recs[len(x.recs)-1]
	*c = append(*c, r)
	x.nrec++
	x.cost += cost
	return nil
}

// extra interns the fields of f this version does not store itself (added
// by a newer writer): they are carried through to the files it hands out and
// to the manifests it writes.
func (b *Builder) extra(f File, cost *int64) (uint32, error) {
	rest := f
	rest.Path, rest.Size, rest.SHA256, rest.MTime, rest.Mode, rest.ETag, rest.VersionID = "", 0, "", time.Time{}, 0, "", ""
	if reflect.ValueOf(rest).IsZero() {
		return 0, nil
	}
	j, err := json.Marshal(rest)
	if err != nil {
		return 0, err
	}
	id, ok := b.extraIDs[string(j)]
	if !ok {
		id = uint32(len(b.x.extras))
		b.extraIDs[string(j)] = id
		b.x.extras = append(b.x.extras, rest)
		*cost += int64(len(j))*2 + internCost
	}
	return id, nil
}

func etagMD5(s string) ([16]byte, bool) {
	var out [16]byte
	if len(s) != 34 || s[0] != '"' || s[33] != '"' {
		return out, false
	}
	for _, c := range s[1:33] {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return out, false // upper case would not round-trip
		}
	}
	hex.Decode(out[:], []byte(s[1:33]))
	return out, true
}

// put copies it into the arena and returns its position.
func (x *Index) put(it []byte) (uint32, error) {
	last := len(x.arena) - 1
	if last < 0 || len(x.arena[last])+len(it) > cap(x.arena[last]) {
		size := max(arenaChunk, len(it))
		if len(x.arena)+1 > maxArenaPos>>arenaShift {
			return 0, errors.New("manifest entries exceed 4 GiB")
		}
		x.arena = append(x.arena, make([]byte, 0, size))
		last++
		if size > arenaChunk {
			// A chunk for this one item: the next one starts a new chunk.
			x.arena[last] = append(x.arena[last], it...)
			x.arena = append(x.arena, make([]byte, 0, arenaChunk)[:0:0])
			return uint32(last) << arenaShift, nil
		}
	}
	off := uint32(last)<<arenaShift | uint32(len(x.arena[last]))
	x.arena[last] = append(x.arena[last], it...)
	return off, nil
}

// Finish sorts the index by path when the files did not come in path order
// and checks the rules that span entries: no path listed twice, no path that
// is a file and the parent directory of another.
func (b *Builder) Finish() (*Index, error) {
	x := b.x
	b.dirIDs, b.extraIDs = nil, nil
	if !b.sorted {
		order := make([]int32, x.nrec)
		for i := range order {
			order[i] = int32(i)
		}
		slices.SortFunc(order, func(a, c int32) int {
			return strings.Compare(x.pathOfRec(int(a)), x.pathOfRec(int(c)))
		})
		x.order = order
	}
	return x, x.checkPaths()
}

// pathOfRec is the path of record i (in added order).
func (x *Index) pathOfRec(i int) string {
	r := &x.recs[i>>recShift][i&(recChunk-1)]
	return joinPath(x.dirs[r.dir], x.name(r))
}

// checkPaths walks the paths in order once (pathChain).
func (x *Index) checkPaths() error {
	var chain pathChain
	for i := range x.Len() {
		p := x.Path(i)
		if c, twice := chain.next(p); c != "" {
			return clashError(x.recNum(i), p, c, twice)
		}
	}
	return nil
}

func (x *Index) recNum(i int) int {
	if x.order != nil {
		return int(x.order[i])
	}
	return i
}

// IndexOf builds an index of files (small manifests, tests) under the
// process's budget.
func IndexOf(files []File) (*Index, error) {
	b := NewBuilder()
	for _, f := range files {
		if err := b.Add(f); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// Merge returns the files of x (nil: none) without those at the positions
// drop reports, plus add (in path order; none of them may be listed in x
// and not dropped), with every rule checked and the added entries charged
// against the budget. x is consumed: the result appends to its storage and
// orders it anew, so a fold of a million-file checkpoint and a small tail
// never holds the checkpoint twice.
func Merge(x *Index, drop func(int) bool, add []File) (*Index, error) {
	if x == nil {
		x = newBuilder(0, 0).x
	}
	b := &Builder{x: x, dirIDs: make(map[string]uint32, len(x.dirs)), extraIDs: map[string]uint32{"": 0},
		budget: BudgetBytes(), max: MaxEntries(), sorted: true}
	for i, d := range x.dirs {
		b.dirIDs[d] = uint32(i)
	}
	for i, e := range x.extras[1:] {
		j, _ := json.Marshal(e)
		b.extraIDs[string(j)] = uint32(i + 1)
	}
	n, first := x.Len(), x.nrec
	for _, f := range add {
		if err := b.Add(f); err != nil {
			return nil, err
		}
	}
	order := make([]int32, 0, n+len(add))
	i, j := 0, 0
	for i < n || j < len(add) {
		if i < n && drop(i) {
			i++
			continue
		}
		if j >= len(add) || (i < n && x.comparePath(x.rec(i), add[j].Path) < 0) {
			order = append(order, int32(x.recNum(i)))
			i++
			continue
		}
		order = append(order, int32(first+j))
		j++
	}
	x.order = order
	return x, x.checkPaths()
}
