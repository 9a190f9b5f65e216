package syncer

import (
	"container/heap"
	"errors"
	"io/fs"
	"iter"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
)

type fileStat struct {
	size  int64
	mtime time.Time
	mode  fs.FileMode
}

func statOf(fi fs.FileInfo) fileStat {
	return fileStat{size: fi.Size(), mtime: fi.ModTime(), mode: fi.Mode().Perm()}
}

func (a fileStat) same(b fileStat) bool {
	return a.size == b.size && a.mtime.Equal(b.mtime) && a.mode == b.mode
}

// errNotRegular is what a queue's stat function reports for a path that is
// there but no longer a regular file: dropped, but not forgotten as removed.
var errNotRegular = errors.New("not a regular file")

// pend is a file waiting to be uploaded.
type pend struct {
	stat      fileStat // at the last event or check
	due       time.Time
	first     time.Time
	gen       uint64 // bumped by every event
	jobGen    uint64
	inflight  bool
	queued    bool
	failures  int
	immediate bool // appeared by rename: no settle period
	removed   bool // deleted while its upload was in flight
	// heapAt is the time of p's entry in queue.dues (zero: none). One entry
	// at or before due is enough: when it comes up early, it is pushed again.
	heapAt time.Time
}

// dueItem is an entry of queue.dues. Entries are never removed in place: one
// whose pend is gone or was scheduled anew is dropped when it comes up.
type dueItem struct {
	at  time.Time
	rel string
	p   *pend
}

// dueHeap orders pending files by due time, so that the loop's work per wake-up
// follows the files that are due, not all that are pending (a backfill of
// thousands of files made every upload result walk the whole set twice).
type dueHeap []dueItem

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *dueHeap) Push(x any)        { *h = append(*h, x.(dueItem)) }
func (h *dueHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	return it
}

type job struct {
	rel  string
	gen  uint64
	seen seen // the object this writer knew at hand-out (conditional write)
}

type result struct {
	rel       string
	gen       uint64
	file      snapshot.File
	stat      fileStat
	gone      bool
	changed   bool
	skipped   bool
	conflict  *conflict // the write met another writer's different content
	err       error
	bytesSent int64
}

// queue decides what is uploaded when: the pending set, the due heap, the
// files waiting for a worker and those skipped as too large. It touches
// neither the filesystem nor the store: the caller passes in what it learned
// (a stat function, the snapshotter's record of uploads), so its rules are
// tested on their own. The event loop goroutine owns it.
type queue struct {
	settle      time.Duration
	maxFileSize int64 // 0: no limit
	// uploaded reports whether rel is recorded as uploaded with exactly st.
	uploaded func(rel string, st fileStat) bool
	// seen is the object this writer knows at rel (nil: none known).
	seen func(rel string) seen

	pending  map[string]*pend
	dues     dueHeap             // pending files by due time (entries may be stale)
	ready    []string            // due and checked, waiting for a free worker
	skipped  map[string]fileStat // too large; not warned about again while unchanged
	draining bool
}

func newQueue(settle time.Duration, maxFileSize int64, uploaded func(string, fileStat) bool) *queue {
	return &queue{settle: settle, maxFileSize: maxFileSize, uploaded: uploaded,
		pending: map[string]*pend{}, skipped: map[string]fileStat{}}
}

func (q *queue) len() int { return len(q.pending) }

// paths are the pending files, in no order.
func (q *queue) paths() iter.Seq[string] { return maps.Keys(q.pending) }

// has reports whether rel is known as a file (pending or skipped).
func (q *queue) has(rel string) bool {
	_, skipped := q.skipped[rel]
	return skipped || q.pending[rel] != nil
}

// schedule makes sure the loop looks at p by p.due.
func (q *queue) schedule(rel string, p *pend) {
	if p.inflight || p.queued || (!p.heapAt.IsZero() && !p.heapAt.After(p.due)) {
		return
	}
	p.heapAt = p.due
	heap.Push(&q.dues, dueItem{at: p.due, rel: rel, p: p})
}

// current reports whether it is the live entry of a pending file.
func (q *queue) current(it dueItem) bool {
	return q.pending[it.rel] == it.p && it.p.heapAt.Equal(it.at)
}

// consider makes rel pending unless what is uploaded already matches st.
func (q *queue) consider(rel string, st fileStat, now time.Time, immediate bool) {
	if q.uploaded(rel, st) {
		if p := q.pending[rel]; p != nil && !p.inflight {
			delete(q.pending, rel)
		}
		return
	}
	q.touch(rel, st, now, immediate)
}

// observe is poll mode's consider: a file found unchanged since the last
// walk keeps its settle time (touching it would restart it, or re-upload a
// file in flight).
func (q *queue) observe(rel string, st fileStat, now time.Time) {
	if p := q.pending[rel]; p != nil && p.stat.same(st) {
		return
	}
	q.consider(rel, st, now, false)
}

// touch records a change of rel.
func (q *queue) touch(rel string, st fileStat, now time.Time, immediate bool) {
	p := q.pending[rel]
	if p == nil {
		p = &pend{first: now}
		q.pending[rel] = p
	}
	p.gen++
	p.stat = st
	p.immediate = immediate
	p.removed = false
	if immediate || q.draining {
		p.due = now
	} else {
		p.due = now.Add(q.settle)
	}
	q.schedule(rel, p)
}

// drain makes every pending file due now, and every later change too: the
// app has stopped writing, so nothing needs to settle any more.
func (q *queue) drain(now time.Time) {
	q.draining = true
	for rel, p := range q.pending {
		p.due = now
		q.schedule(rel, p)
	}
}

// forgetTree forgets rel, and with tree everything under it too.
func (q *queue) forgetTree(rel string, tree bool) {
	if !tree {
		q.forget(rel)
		return
	}
	under := rel + "/"
	for _, m := range []iter.Seq[string]{maps.Keys(q.pending), maps.Keys(q.skipped)} {
		for k := range m {
			if strings.HasPrefix(k, under) {
				q.forget(k)
			}
		}
	}
}

// forget drops one file; an upload in flight is only marked, its result then
// forgets it.
func (q *queue) forget(k string) {
	if p := q.pending[k]; p != nil {
		if p.inflight {
			p.removed = true
		} else {
			delete(q.pending, k)
		}
	}
	delete(q.skipped, k)
}

// keepOnly drops the pending files a full walk did not see (vanished without
// an event), except those in flight: their result tells.
func (q *queue) keepOnly(seen *walkSet) {
	for k, p := range q.pending {
		if !seen.has(k) && !p.inflight {
			delete(q.pending, k)
		}
	}
}

// nextDue is when the loop must look at the queue again (zero: no timer).
func (q *queue) nextDue() time.Time {
	if len(q.ready) > 0 {
		return time.Time{} // a worker's result wakes the loop
	}
	for len(q.dues) > 0 && !q.current(q.dues[0]) {
		heap.Pop(&q.dues)
	}
	if len(q.dues) > 0 {
		return q.dues[0].at
	}
	return time.Time{}
}

// tooLarge is a file newly over SYNC_MAX_FILE_SIZE.
type tooLarge struct {
	rel  string
	size int64
}

// verdicts are what a dispatch leaves to the caller: files to forget
// everywhere, and skips to warn about and count.
type verdicts struct {
	gone     []string
	tooLarge []tooLarge
}

// dispatch checks the files due at now with stat (fs.ErrNotExist: removed;
// errNotRegular: no longer a file) and moves the stable ones to ready.
func (q *queue) dispatch(now time.Time, stat func(rel string) (fileStat, error)) verdicts {
	var v verdicts
	for len(q.dues) > 0 && !q.dues[0].at.After(now) {
		it := heap.Pop(&q.dues).(dueItem)
		if !q.current(it) {
			continue
		}
		it.p.heapAt = time.Time{}
		if it.p.inflight || it.p.queued {
			continue // its result schedules it again
		}
		if it.p.due.After(now) {
			q.schedule(it.rel, it.p)
			continue
		}
		st, err := stat(it.rel)
		q.check(it.rel, it.p, st, err, now, &v)
	}
	return v
}

func (q *queue) check(rel string, p *pend, st fileStat, err error, now time.Time, v *verdicts) {
	switch {
	case err != nil:
		delete(q.pending, rel)
		if errors.Is(err, fs.ErrNotExist) {
			v.gone = append(v.gone, rel)
		}
	case !st.same(p.stat) && !p.immediate && !q.draining:
		// Written without an event (mmap) or an event is still queued: not
		// stable yet.
		p.stat, p.due = st, now.Add(q.settle)
		q.schedule(rel, p)
	case q.uploaded(rel, st):
		delete(q.pending, rel)
	case q.maxFileSize > 0 && st.size > q.maxFileSize:
		if old, ok := q.skipped[rel]; !ok || !old.same(st) {
			v.tooLarge = append(v.tooLarge, tooLarge{rel: rel, size: st.size})
			q.skipped[rel] = st
		}
		delete(q.pending, rel)
	default:
		p.stat = st
		p.queued = true
		q.ready = append(q.ready, rel)
	}
}

// handOut gives ready files to free workers, as many as jobs takes without
// blocking.
func (q *queue) handOut(jobs chan<- job) {
	for len(q.ready) > 0 {
		rel := q.ready[0]
		p := q.pending[rel]
		if p == nil || !p.queued {
			q.ready = q.ready[1:]
			continue
		}
		var sn seen
		if q.seen != nil {
			sn = q.seen(rel)
		}
		select {
		case jobs <- job{rel: rel, gen: p.gen, seen: sn}:
			q.ready = q.ready[1:]
			p.queued, p.inflight, p.jobGen = false, true, p.gen
		default:
			return
		}
	}
	q.ready = nil
}

// outcome is what an upload's result means for the rest of the syncer.
type outcome int

const (
	outForget   outcome = iota // the file is gone: forget it everywhere
	outSkipped                 // dropped, nothing to record
	outFailed                  // retried later (retryIn; failures 0: no longer pending)
	outChanged                 // changed during the upload: goes again
	outUploaded                // record it
)

type finish struct {
	outcome  outcome
	failures int
	retryIn  time.Duration
}

// finished applies a worker's result to the pending set.
func (q *queue) finished(r result, now time.Time) finish {
	p := q.pending[r.rel]
	if p != nil {
		p.inflight = false
	}
	// Whatever stays pending (a retry, a change during the upload) needs an
	// entry in dues again: it had none while in flight.
	defer func() {
		if p := q.pending[r.rel]; p != nil {
			q.schedule(r.rel, p)
		}
	}()
	switch {
	case r.gone || (p != nil && p.removed):
		delete(q.pending, r.rel)
		return finish{outcome: outForget}
	case r.skipped:
		delete(q.pending, r.rel)
		return finish{outcome: outSkipped}
	case r.err != nil:
		if p == nil {
			return finish{outcome: outFailed}
		}
		p.failures++
		// A permanent error (denied, bad request) on one file must not stop
		// the others: it is retried, only slower.
		wait := min(time.Minute<<min(p.failures-1, 4), 10*time.Minute)
		p.due = now.Add(wait)
		return finish{outcome: outFailed, failures: p.failures, retryIn: wait}
	case r.changed:
		if p == nil {
			p = &pend{first: now}
			q.pending[r.rel] = p
		}
		p.stat, p.due = r.stat, now.Add(q.settle)
		if q.draining {
			p.due = now
		}
		return finish{outcome: outChanged}
	default:
		if p != nil && p.gen == r.gen {
			delete(q.pending, r.rel)
		}
		return finish{outcome: outUploaded}
	}
}

// backlog sums up the pending files for the queue metrics.
func (q *queue) backlog(now time.Time) (files int, bytes int64, oldest time.Duration) {
	var first time.Time
	for _, p := range q.pending {
		bytes += p.stat.size
		if first.IsZero() || p.first.Before(first) {
			first = p.first
		}
	}
	if !first.IsZero() {
		oldest = now.Sub(first)
	}
	return len(q.pending), bytes, oldest
}

// sorted lists the pending files in order, for the message of a drain that
// ran out of time.
func (q *queue) sorted() []string { return slices.Sorted(maps.Keys(q.pending)) }
