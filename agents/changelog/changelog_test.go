package changelog

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/test/peers"
)

var (
	base = time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)
	wa   = Writer{Namespace: "prod", Pod: "files-0", UID: "u-a"}
	wb   = Writer{Namespace: "prod", Pod: "files-1", UID: "u-b"}
	sha  = strings.Repeat("ab", 32)
)

func write(path string, mtime time.Time, content string) Change {
	h := strings.Repeat(content[:1], 64)
	return Change{File: snapshot.File{Path: path, Size: int64(len(content)), SHA256: h, MTime: mtime, Mode: 0o644}}
}

func del(path string, at time.Time) Change {
	return Change{File: snapshot.File{Path: path, MTime: at}, Deleted: true}
}

func TestKeyRoundTrip(t *testing.T) {
	k := Key(base.Add(123456789), wa)
	info, ok := parseKey(k)
	if !ok || !info.Time.Equal(base.Add(123456789)) || Key(info.Time, wa) != k {
		t.Fatalf("%s -> %+v %v", k, info, ok)
	}
	if Key(base, wa) == Key(base, Writer{Namespace: "staging", Pod: "files-0", UID: "u-a"}) {
		t.Fatal("a Pod of the same name in another namespace gets the same key")
	}
	for _, bad := range []string{"log/x.json.gz", "log/20261130T100000.000000000Z-zz.json.gz", "log/20261130T100000.000000000Z-0123456789abcdef.json",
		"snapshots/20261130T100000.000000000Z-0123456789abcdef.json.gz", "log/20261130T100000.000000000Z-0123456789ABCDEF.json.gz"} {
		if _, ok := parseKey(bad); ok {
			t.Errorf("%s parsed as a batch", bad)
		}
	}
}

// The rule is a per-path last-writer-wins register: any order of the same
// batches, with repeats, folds to the same state.
func TestFoldOrderAndRepeatsDoNotMatter(t *testing.T) {
	var batches []*Batch
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 40 {
		w := wa
		if i%2 == 1 {
			w = wb
		}
		b := &Batch{Format: Format, Writer: w, Time: base.Add(time.Duration(i) * time.Second)}
		for range 5 {
			p := fmt.Sprintf("d/f%d", r.IntN(8))
			mt := base.Add(time.Duration(r.IntN(20)) * time.Second) // many equal mtimes: ties by writer
			if r.IntN(4) == 0 {
				b.Changes = append(b.Changes, del(p, mt))
			} else {
				b.Changes = append(b.Changes, write(p, mt, fmt.Sprint(r.IntN(9))))
			}
		}
		batches = append(batches, b)
	}
	want := fold(batches).Files()
	for range 50 {
		shuffled := slices.Clone(batches)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		shuffled = append(shuffled, shuffled[:r.IntN(len(shuffled))]...)
		if got := fold(shuffled).Files(); !slices.EqualFunc(got, want, sameFile) {
			t.Fatalf("order changed the result:\n%v\nwant\n%v", got, want)
		}
	}
}

func fold(bs []*Batch) *State {
	s := NewState()
	for _, b := range bs {
		s.Apply(b)
	}
	return s
}

func sameFile(a, b snapshot.File) bool {
	return a.Path == b.Path && a.SHA256 == b.SHA256 && a.MTime.Equal(b.MTime)
}

func TestRule(t *testing.T) {
	s := NewState()
	s.Apply(&Batch{Writer: wa, Changes: []Change{write("x", base.Add(2*time.Second), "a"), write("y", base, "a"), write("z", base, "a")}})
	s.Apply(&Batch{Writer: wb, Changes: []Change{write("x", base.Add(time.Second), "b"), write("y", base, "b"), del("z", base.Add(time.Second))}})
	files := s.Files()
	if len(files) != 2 || files[0].SHA256[0] != 'a' || files[1].SHA256[0] != 'b' {
		t.Fatalf("newest mtime wins x (a), equal mtime: greater writer wins y (b), newer delete removes z: %+v", files)
	}
}

func TestValidateRefusesHostileChanges(t *testing.T) {
	for name, c := range map[string]Change{
		"dotdot": write("../etc/passwd", base, "a"), "absolute": write("/etc/passwd", base, "a"),
		"delete dotdot": del("a/../../x", base), "delete no time": del("x", time.Time{}),
		"setuid": {File: snapshot.File{Path: "x", SHA256: sha, MTime: base, Mode: 0o4755}},
	} {
		b := &Batch{Format: Format, Writer: wa, Time: base, Changes: []Change{c}}
		if b.Validate() == nil {
			t.Errorf("%s accepted", name)
		}
	}
}

// stores runs f on file:// and on every real S3 server.
func stores(t *testing.T, f func(t *testing.T, st store.Store)) {
	t.Run("file", func(t *testing.T) {
		st, err := store.Open(context.Background(), fileConfig(t), nil)
		if err != nil {
			t.Fatal(err)
		}
		f(t, st)
	})
	if testing.Short() {
		return
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			srv := peers.StartS3(t, kind)
			st, err := store.Open(context.Background(), srv.StoreConfig(t, "changelog/"+strings.ReplaceAll(t.Name(), "/", "_")), nil)
			if err != nil {
				t.Fatal(err)
			}
			f(t, st)
		})
	}
}

// Two writers append concurrently, a checkpoint folds the old part, and the
// fold at any instant is the checkpoint plus the tail after it.
func TestFoldOnStores(t *testing.T) {
	stores(t, func(t *testing.T, st store.Store) {
		ctx := context.Background()
		appendB := func(w Writer, at time.Time, cs ...Change) {
			t.Helper()
			if _, err := Append(ctx, st, &Batch{Writer: w, Time: at, Changes: cs}); err != nil {
				t.Fatal(err)
			}
		}
		appendB(wa, base.Add(1*time.Second), write("a.txt", base, "1"), write("shared", base, "a"))
		appendB(wb, base.Add(1*time.Second), write("b.txt", base, "2"), write("shared", base.Add(time.Second), "b"))
		appendB(wa, base.Add(3*time.Second), del("a.txt", base.Add(3*time.Second)))
		// A retried append of a batch that already landed is not an error.
		appendB(wa, base.Add(3*time.Second), del("a.txt", base.Add(3*time.Second)))

		at2, err := Fold(ctx, st, base.Add(2*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if got := paths(at2); got != "a.txt b.txt shared" || at2.Files[2].SHA256[0] != 'b' {
			t.Fatalf("state at +2s: %s %+v", got, at2.Files)
		}
		// A checkpoint at +2s (now = +2s + Margin), then later changes.
		if _, err := Checkpoint(ctx, st, base.Add(2*time.Second+Margin), 0, snapshot.Writer{Pod: "files-0"}); err != nil {
			t.Fatal(err)
		}
		appendB(wb, base.Add(5*time.Second), write("c.txt", base.Add(5*time.Second), "3"))
		now, err := Fold(ctx, st, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		if got := paths(now); got != "b.txt c.txt shared" {
			t.Fatalf("state now: %s", got)
		}
		again, err := Fold(ctx, st, base.Add(2*time.Second))
		if err != nil || paths(again) != "a.txt b.txt shared" {
			t.Fatalf("point in time after the checkpoint: %s %v", paths(again), err)
		}
		// Nothing new up to the horizon: not due, and no second checkpoint.
		if due, err := CheckpointDue(ctx, st, base.Add(2*time.Second+Margin), 0); err != nil || due {
			t.Fatalf("checkpoint due without new batches: %v %v", due, err)
		}
		if due, err := CheckpointDue(ctx, st, base.Add(5*time.Second+Margin), 0); err != nil || !due {
			t.Fatalf("checkpoint not due with c.txt's batch past the horizon: %v %v", due, err)
		}
		if id, err := Checkpoint(ctx, st, base.Add(2*time.Second+Margin), 0, snapshot.Writer{Pod: "files-0"}); err != nil || id != "" {
			t.Fatalf("checkpoint without new batches: %q %v", id, err)
		}
		// A writer whose clock runs an hour ahead: "latest" still has its change.
		appendB(wa, time.Now().Add(time.Hour), write("ahead.txt", base.Add(6*time.Second), "4"))
		if latest, err := Fold(ctx, st, time.Time{}); err != nil || paths(latest) != "ahead.txt b.txt c.txt shared" {
			t.Fatalf("latest with a writer ahead: %v %v", latest, err)
		}
	})
}

func paths(m *snapshot.Manifest) string {
	var p []string
	for _, f := range m.Files {
		p = append(p, f.Path)
	}
	return strings.Join(p, " ")
}

// One writer's file where another has a directory: the manifest keeps the
// directory's files (a manifest cannot hold both) and stays valid.
func TestFileDirClash(t *testing.T) {
	s := NewState()
	s.Apply(&Batch{Writer: wa, Time: base, Changes: []Change{write("a", base.Add(time.Hour), "1"), write("a-x", base, "2")}})
	s.Apply(&Batch{Writer: wb, Time: base, Changes: []Change{write("a/b/c", base, "3"), write("d/e", base, "4")}})
	m := s.Manifest(base, snapshot.Writer{Pod: "p"})
	if got := paths(m); got != "a-x a/b/c d/e" {
		t.Fatalf("fold of a file/dir clash: %s", got)
	}
	if err := m.Validate(); err != nil {
		t.Fatal(err)
	}
}

// refFold is the fold as a plain map (the implementation before the compact
// form): the reference the compact state must agree with.
func refFold(base []snapshot.File, bw string, bs []*Batch) []snapshot.File {
	s := map[string]Entry{}
	for _, f := range base {
		s[f.Path] = Entry{Change: Change{File: f}, Writer: bw}
	}
	for _, b := range bs {
		for _, c := range b.Changes {
			e := Entry{Change: c, Writer: b.Writer.ID()}
			if old, ok := s[c.Path]; !ok || e.beats(old) {
				s[c.Path] = e
			}
		}
	}
	dirs := map[string]bool{}
	for p, e := range s {
		if e.Deleted {
			continue
		}
		for i := len(p) - 1; i > 0; i-- {
			if p[i] == '/' {
				dirs[p[:i]] = true
			}
		}
	}
	var out []snapshot.File
	for p, e := range s {
		if !e.Deleted && !dirs[p] {
			out = append(out, e.File)
		}
	}
	slices.SortFunc(out, func(a, b snapshot.File) int { return strings.Compare(a.Path, b.Path) })
	return out
}

// A checkpoint in compact form plus a tail of batches folds to what the
// plain map fold gives, file/directory clashes included, and Compact (which
// reuses the checkpoint's index) agrees with Files.
func TestFoldOverCheckpoint(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	names := []string{"a", "a-1", "a/b", "a/c", "b", "b/x", "b/x/y", "c.txt", "d/e/f", "d/e", "z"}
	at := func() time.Time { return base.Add(time.Duration(r.IntN(6)) * time.Second) }
	for range 500 {
		var files []snapshot.File
		for _, p := range names {
			if r.IntN(2) == 0 {
				files = append(files, write(p, at(), "cp").File)
			}
		}
		files = refFold(files, "", nil) // a valid checkpoint: no file/dir pair
		var bs []*Batch
		for i := range 1 + r.IntN(4) {
			b := &Batch{Format: Format, Writer: []Writer{wa, wb}[i%2], Time: base}
			for _, p := range names {
				switch r.IntN(4) {
				case 0:
					b.Changes = append(b.Changes, write(p, at(), fmt.Sprint(r.IntN(3))))
				case 1:
					b.Changes = append(b.Changes, del(p, at()))
				}
			}
			bs = append(bs, b)
		}
		cp := snapshot.Writer{Pod: "cp"}
		m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(base, ""), Created: base, Writer: cp, Files: files}
		s, err := FromManifest(m)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range bs {
			s.Apply(b)
		}
		want := refFold(files, Writer{Pod: "cp"}.ID(), bs)
		if got := s.Files(); !slices.EqualFunc(got, want, sameFile) {
			t.Fatalf("Files:\n%v\nwant\n%v", got, want)
		}
		c, err := s.Compact(base, cp)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Files.Files(); !slices.EqualFunc(got, want, sameFile) {
			t.Fatalf("Compact:\n%v\nwant\n%v", got, want)
		}
	}
}
