package syncer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// MetaWriter is the data objects' user metadata naming their writer
// (namespace/pod/uid): the tie-breaker of the rule when two writers put
// different content at one path.
const MetaWriter = "writer"

// ConflictsDir holds the losers' bytes of write conflicts:
// conflicts/PATH/SHA256[:16], with the usual metadata and the writer.
const ConflictsDir = "conflicts/"

// ConflictKey is where the bytes of a conflict's loser are kept.
func ConflictKey(path, sha string) string { return ConflictsDir + path + "/" + sha[:16] }

// seen is what this writer knew of a path's object when it queued the
// upload: its ETag ("" = no object known: the write must create it) and the
// sha256 of that version.
type seen struct{ etag, sha string }

// conflict is a write conflict: two writers put different content at one
// path. The rule (newer mtime, then greater writer id) picks the winner; the
// loser's bytes are kept under ConflictKey.
type conflict struct {
	path        string
	winner      string // writer id
	loser       string
	loserKey    string
	weLost      bool
	theirObject store.ObjectInfo // the object data/PATH holds when we lost
}

func (c *conflict) String() string {
	return fmt.Sprintf("write conflict on %s: %s wins by the rule (newer mtime, then greater writer id); the bytes of %s are kept at %s",
		c.path, c.winner, c.loser, c.loserKey)
}

// resolve handles a conditional write that failed: data/PATH is not the
// object this writer saw. Identical content is no conflict (nothing is
// sent); the version this writer saw under another ETag is a plain update;
// anything else is a conflict decided by the rule, whose loser's bytes are
// kept. put writes data/PATH under the given conditions (a multipart upload
// applies them at its completion). body is what this writer stores for
// file (encoded or not, as opts say). It returns the object data/PATH now
// holds.
func (u *uploader) resolve(ctx context.Context, body *codec.Body, file snapshot.File, sn seen, opts store.PutOptions, put putFunc) (store.ObjectInfo, *conflict, error) {
	key := snapshot.DataKey(file.Path)
	for range 5 {
		cur, err := u.st.Head(ctx, key, store.HeadOptions{})
		if errors.Is(err, store.ErrNotExist) {
			info, err := put(ctx, store.PutOptions{IfNoneMatch: true})
			if errors.Is(err, store.ErrPrecondition) {
				continue
			}
			return info, nil, err
		}
		if err != nil {
			return store.ObjectInfo{}, nil, err
		}
		theirSHA := cur.Metadata[snapshot.MetaSHA256]
		if theirSHA == file.SHA256 && codec.Known(cur.Metadata[snapshot.MetaEncoding]) {
			// The same content (compared on the original's sha256, however
			// either writer encodes it): uploaded once.
			return cur, nil, nil
		}
		var c *conflict
		// Our own earlier version (an upload whose outcome this writer did not
		// keep, e.g. the file changed while it went up) is an update: one
		// writer's versions follow each other and never conflict.
		own := cur.Metadata[MetaWriter] == u.writer
		if !own && (theirSHA != sn.sha || sn.sha == "") {
			theirs := changelog.Entry{Writer: cur.Metadata[MetaWriter]}
			theirs.MTime, _ = time.Parse(time.RFC3339Nano, cur.Metadata[snapshot.MetaMTime])
			ours := changelog.Entry{Change: changelog.Change{File: file}, Writer: u.writer}
			if !ours.Beats(theirs) {
				lk := ConflictKey(file.Path, file.SHA256)
				meta := opts.Metadata
				if _, err := u.st.Put(ctx, lk, body.Open(), body.Size, store.PutOptions{Metadata: meta, ContentType: opts.ContentType,
					ContentEncoding: opts.ContentEncoding, IfNoneMatch: true}); err != nil && !errors.Is(err, store.ErrPrecondition) {
					return store.ObjectInfo{}, nil, err
				}
				return cur, &conflict{path: file.Path, winner: theirs.Writer, loser: u.writer, loserKey: lk, weLost: true, theirObject: cur}, nil
			}
			lk, err := u.keepTheirs(ctx, key, cur, file.Path)
			if err != nil {
				return store.ObjectInfo{}, nil, err
			}
			c = &conflict{path: file.Path, winner: u.writer, loser: theirs.Writer, loserKey: lk}
		}
		info, err := put(ctx, store.PutOptions{IfMatch: cur.ETag})
		if errors.Is(err, store.ErrPrecondition) {
			continue // changed again meanwhile: look again
		}
		return info, c, err
	}
	return store.ObjectInfo{}, nil, &store.Error{Op: "put", Key: key, Err: errors.New("object changed under us repeatedly"), Retryable: true}
}

// keepTheirs copies the object another writer put at data/PATH to its
// conflict key before this writer's version replaces it.
func (u *uploader) keepTheirs(ctx context.Context, key string, cur store.ObjectInfo, path string) (string, error) {
	sha := cur.Metadata[snapshot.MetaSHA256]
	if len(sha) < 16 {
		sha = fmt.Sprintf("%016x", cur.Size) + "etag" + cur.ETag
	}
	lk := ConflictKey(path, sha)
	rc, info, err := u.st.Get(ctx, key, store.GetOptions{VersionID: cur.VersionID})
	if err != nil {
		return "", err
	}
	defer rc.Close()
	_, err = u.st.Put(ctx, lk, rc, info.Size, store.PutOptions{Metadata: cur.Metadata, ContentEncoding: info.ContentEncoding, IfNoneMatch: true})
	if err != nil && !errors.Is(err, store.ErrPrecondition) {
		return "", err
	}
	return lk, nil
}

// putFunc writes data/PATH under the conditions of cond.
type putFunc func(ctx context.Context, cond store.PutOptions) (store.ObjectInfo, error)
