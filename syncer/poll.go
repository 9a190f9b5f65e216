package syncer

import (
	"time"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"
)

// Filesystem magics (statfs f_type) on which inotify does not see other
// clients' writes: a shared volume is polled there.
var pollFilesystems = map[int64]string{
	0x6969:     "nfs",
	0x517b:     "smb",
	0xff534d42: "cifs",
	0xfe534d42: "smb2",
	0x65735546: "fuse",
	0x01021997: "9p",
	0x00c36400: "ceph",
}

// watchMode resolves SYNC_WATCH=auto with statfs(2) on SYNC_DIR: poll on
// network and FUSE filesystems, inotify elsewhere. It returns the mode and
// the filesystem that decided it.
func watchMode(mode, dir string) (poll bool, fs string) {
	switch mode {
	case "poll":
		return true, ""
	case "inotify":
		return false, ""
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false, ""
	}
	name, ok := pollFilesystems[int64(st.Type)]
	return ok, name
}

// pollNotifier stands in for fsnotify in poll mode: no watches, no events;
// the loop walks the tree every SYNC_POLL_INTERVAL instead.
type pollNotifier struct {
	events chan fsnotify.Event
	errors chan error
}

func newPollNotifier() (notifier, error) {
	return &pollNotifier{events: make(chan fsnotify.Event), errors: make(chan error)}, nil
}

func (*pollNotifier) Add(string) error                { return nil }
func (*pollNotifier) Remove(string) error             { return nil }
func (p *pollNotifier) Events() <-chan fsnotify.Event { return p.events }
func (p *pollNotifier) Errors() <-chan error          { return p.errors }
func (*pollNotifier) Close() error                    { return nil }

// poll is one walk of poll mode: readdir and lstat per directory. A file
// new or changed since the last walk is pending (and settles like an event's
// file: a later walk that finds it changed again restarts its settle time);
// a file the walk no longer finds is gone.
func (s *Syncer) poll(now time.Time) {
	seen := s.led.files.walkSet()
	s.w.watches = 0 // no watches: the metric counts the directories walked
	err := s.w.scan(s.cfg.Dir, func(rel string, st fileStat) {
		seen.add(rel)
		s.q.observe(rel, st, now)
	})
	if err != nil {
		s.log.Error("poll walk failed", "err", err)
		return
	}
	for _, rel := range s.led.missing(seen) {
		s.gone(rel)
	}
	s.q.keepOnly(seen)
}
