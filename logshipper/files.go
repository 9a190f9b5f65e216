package logshipper

import (
	"errors"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/podkeeper/podkeeper/agents/safefs"
)

// The app writing the logs is untrusted (docs/security.md): every stat, open
// and directory read below a glob's static directory goes through
// agents/safefs, so a link anywhere on the path (a file linked to a secret, a
// directory swapped for a link while we walk it) is never followed, and a FIFO
// or device is never opened for reading. What is refused is logged once per
// path and counted in files_skipped_total{reason}.

// Reasons of files_skipped_total.
const (
	skipLink       = "symlink"
	skipNotRegular = "not_regular"
)

// maxSkipMemo bounds the memory of paths already reported: a hostile app can
// create any number of links.
const maxSkipMemo = 10000

// globRoot is one LOGSHIP_PATHS glob split at its first wildcard: base is
// the static directory (configuration, opened as the safefs root), pat the
// pattern elements below it (the last one matches the file names).
type globRoot struct {
	base string
	pat  []string
	root *safefs.Root
	id   fileID // of the directory root holds
}

func newGlobRoots(globs []string) []*globRoot {
	out := make([]*globRoot, 0, len(globs))
	for _, g := range globs {
		els := strings.Split(strings.TrimPrefix(filepath.Clean(g), "/"), "/")
		k := slices.IndexFunc(els, func(el string) bool { return strings.ContainsAny(el, `*?[\`) })
		if k < 0 || k > len(els)-1 {
			k = len(els) - 1
		}
		out = append(out, &globRoot{base: "/" + strings.Join(els[:k], "/"), pat: els[k:]})
	}
	return out
}

// path is the absolute path of rel below the glob's base.
func (g *globRoot) path(rel string) string { return filepath.Join(g.base, rel) }

// open returns the root of g, opened (again) when base names a directory
// other than the one held: the app may create or recreate its log directory.
// A base that is a link is refused, not followed; nil when there is no root
// now.
func (t *tailer) openRoot(g *globRoot) *safefs.Root {
	var st unix.Stat_t
	err := unix.Lstat(g.base, &st)
	switch {
	case err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR:
		if g.root != nil && g.id == (fileID{Dev: uint64(st.Dev), Ino: st.Ino}) {
			return g.root
		}
	case err == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK:
		t.skip(g.base, skipLink)
		g.drop()
		return nil
	default:
		g.drop()
		return nil
	}
	g.drop()
	r, err := safefs.OpenRootNoFollow(g.base)
	if err != nil {
		if errors.Is(err, safefs.ErrLink) {
			t.skip(g.base, skipLink)
		}
		return nil
	}
	fi, err := r.Stat()
	if err != nil {
		r.Close()
		return nil
	}
	g.root, g.id = r, statID(fi)
	return r
}

func (g *globRoot) drop() {
	if g.root != nil {
		g.root.Close()
		g.root = nil
	}
}

// found is a regular file a glob matched.
type found struct {
	rel string
	id  fileID
}

// match walks g's pattern below its root and returns the regular files that
// match it, sorted. Every directory on the way is opened through the root
// (never through a link); the files are described from their directory's
// descriptor without following a final link. dirs receives the directories
// that can hold matching files (for fsnotify).
func (t *tailer) match(g *globRoot, r *safefs.Root, dirs func(string)) []found {
	var out []found
	var walk func(rel string, pat []string)
	walk = func(rel string, pat []string) {
		d, err := r.OpenDir(rel)
		if err != nil {
			if errors.Is(err, safefs.ErrLink) {
				t.skip(g.path(rel), skipLink)
			}
			return
		}
		defer d.Close()
		names, _ := d.Readdirnames(-1)
		slices.Sort(names)
		last := len(pat) == 1
		if last {
			dirs(g.path(rel))
		}
		for _, name := range names {
			if ok, _ := filepath.Match(pat[0], name); !ok {
				continue
			}
			sub := path.Join(rel, name)
			if !last {
				walk(sub, pat[1:])
				continue
			}
			var st unix.Stat_t
			if unix.Fstatat(int(d.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
				continue
			}
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFREG:
				out = append(out, found{rel: sub, id: fileID{Dev: uint64(st.Dev), Ino: st.Ino}})
			case unix.S_IFLNK:
				t.skip(g.path(sub), skipLink)
			case unix.S_IFDIR:
				// a directory named like a log file: not a log file
			default:
				t.skip(g.path(sub), skipNotRegular)
			}
		}
	}
	walk("", g.pat)
	return out
}

// skip reports a path that is never read: once per path and reason.
func (t *tailer) skip(p, reason string) {
	key := reason + "\x00" + p
	if t.skipped[key] {
		return
	}
	if len(t.skipped) >= maxSkipMemo {
		clear(t.skipped)
	}
	t.skipped[key] = true
	t.m.skipped.WithLabelValues(reason).Inc()
	what := "a symbolic link (never followed)"
	if reason == skipNotRegular {
		what = "not a regular file (FIFO, device or socket: never opened)"
	}
	t.log.Warn("skipping a path below the log directories: "+what, "path", p, "reason", reason)
}

// openFile opens rel below r for reading: no link on the path, a regular
// file only. A refusal is reported; nil when there is nothing to read.
func (t *tailer) openFile(g *globRoot, r *safefs.Root, rel string) *os.File {
	f, err := r.Open(rel)
	switch {
	case err == nil:
		return f
	case errors.Is(err, safefs.ErrLink):
		t.skip(g.path(rel), skipLink)
	case errors.Is(err, safefs.ErrNotRegular):
		t.skip(g.path(rel), skipNotRegular)
	case errors.Is(err, fs.ErrNotExist):
		// rotated away between the directory read and the open
	default:
		t.log.Warn("cannot open log file; will retry", "path", g.path(rel), "err", err)
	}
	return nil
}
