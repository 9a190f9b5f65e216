package restore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// ListEntry is one line of `restore list`.
type ListEntry struct {
	snapshot.Info
	Files int
	Bytes int64
	Err   error // the manifest could not be read or was refused
}

// List returns every snapshot of st with its file count and size, oldest first.
func List(ctx context.Context, st store.Store) ([]ListEntry, error) {
	infos, err := snapshot.List(ctx, st)
	if err != nil {
		return nil, err
	}
	out := make([]ListEntry, len(infos))
	for i, info := range infos {
		out[i].Info = info
		m, err := snapshot.LoadCompact(ctx, st, info)
		if err != nil {
			out[i].Err = err
			continue
		}
		out[i].Files = m.Files.Len()
		for j := range m.Files.Len() {
			out[i].Bytes += m.Files.Size(j)
		}
	}
	return out, nil
}

// PrintList writes the table of `restore list`.
func PrintList(w io.Writer, entries []ListEntry) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCREATED\tFILES\tBYTES")
	for _, e := range entries {
		if e.Err != nil {
			fmt.Fprintf(tw, "%s\t%s\t-\t-\tUNREADABLE: %v\n", e.ID, e.Created.Format(time.RFC3339), e.Err)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", e.ID, e.Created.Format(time.RFC3339), e.Files, e.Bytes)
	}
	tw.Flush()
}

// Problem is one failed check of `restore verify`.
type Problem struct {
	Path   string
	Reason string
}

// VerifyReport is the outcome of Verify.
type VerifyReport struct {
	Snapshot string
	Files    int
	Bytes    int64
	Problems []Problem
}

// Verify checks that every object of the snapshot spec exists with the recorded
// size and sha256 metadata; deep also downloads each and hashes it.
func Verify(ctx context.Context, st store.Store, spec string, deep bool, concurrency int) (*VerifyReport, error) {
	m, err := Resolve(ctx, st, spec)
	if err != nil {
		return nil, err
	}
	rep := &VerifyReport{Snapshot: m.ID, Files: m.Files.Len()}
	var mu sync.Mutex
	// A check that cannot run is reported, but does not stop the others: the
	// report still lists every problem found.
	var g errgroup.Group
	g.SetLimit(max(1, min(concurrency, m.Files.Len())))
	for _, f := range m.Files.All() {
		rep.Bytes += f.Size
		g.Go(func() error {
			reason, err := verifyOne(ctx, st, f, deep)
			if reason != "" {
				mu.Lock()
				rep.Problems = append(rep.Problems, Problem{Path: f.Path, Reason: reason})
				mu.Unlock()
			}
			return err
		})
	}
	return rep, g.Wait()
}

func retry(ctx context.Context, op func(context.Context) error) error {
	return backoff.Retry(ctx, backoff.Default, store.IsRetryable, nil, op)
}

// verifyOne returns a problem description, or an error when the check itself
// could not run (then the verdict is unknown, not "bad").
func verifyOne(ctx context.Context, st store.Store, f snapshot.File, deep bool) (string, error) {
	key := snapshot.DataKey(f.Path)
	var info store.ObjectInfo
	err := retry(ctx, func(ctx context.Context) error {
		var err error
		info, err = head(ctx, st, key, f.VersionID)
		return err
	})
	if errors.Is(err, store.ErrNotExist) {
		return "object " + key + versionText(f) + " is missing", nil
	}
	if err != nil {
		return "", err
	}
	if enc := info.Metadata[snapshot.MetaEncoding]; enc != f.Encoding {
		return fmt.Sprintf("object %s%s is stored with encoding %s, the snapshot says %s", key, versionText(f), encodingText(enc), encodingText(f.Encoding)), nil
	}
	if f.Encoding != codec.None {
		if got := info.Metadata[snapshot.MetaSize]; got != strconv.FormatInt(f.Size, 10) {
			return fmt.Sprintf("object %s%s has size metadata %q, the snapshot says %d", key, versionText(f), got, f.Size), nil
		}
	} else if info.Size != f.Size {
		return fmt.Sprintf("object %s%s has %d bytes, the snapshot says %d", key, versionText(f), info.Size, f.Size), nil
	}
	if got := info.Metadata[snapshot.MetaSHA256]; got != f.SHA256 {
		return fmt.Sprintf("object %s%s has sha256 metadata %q, the snapshot says %s", key, versionText(f), got, f.SHA256), nil
	}
	if !deep {
		return "", nil
	}
	var sum string
	var invalid *codec.InvalidError
	err = retry(ctx, func(ctx context.Context) error {
		rc, _, err := st.Get(ctx, key, store.GetOptions{VersionID: f.VersionID})
		if err != nil {
			return err
		}
		defer rc.Close()
		// Decoded (when encoded) and held to the recorded size.
		content, err := codec.DecodeSized(f.Encoding, rc, f.Size)
		if err != nil {
			if errors.As(err, &invalid) {
				return nil
			}
			return err
		}
		defer content.Close()
		h := sha256.New()
		if _, err := io.Copy(h, content); err != nil {
			if errors.As(err, &invalid) {
				return nil
			}
			return retryableRead("get", key, err)
		}
		sum = hex.EncodeToString(h.Sum(nil))
		return nil
	})
	if err != nil {
		return "", err
	}
	if invalid != nil {
		return fmt.Sprintf("object %s%s: %v", key, versionText(f), invalid), nil
	}
	if sum != f.SHA256 {
		return fmt.Sprintf("object %s%s hashes to %s, the snapshot says %s", key, versionText(f), sum, f.SHA256), nil
	}
	return "", nil
}

func versionText(f snapshot.File) string {
	if f.VersionID == "" {
		return ""
	}
	return " (version " + f.VersionID + ")"
}

// head is Store.Head, for the entry's version when it has one.
func head(ctx context.Context, st store.Store, key, version string) (store.ObjectInfo, error) {
	return st.Head(ctx, key, store.HeadOptions{VersionID: version})
}

// ConflictsDir is where syncers keep the losers' bytes of write conflicts
// (two writers put different content at one path): conflicts/PATH/SHA256[:16].
const ConflictsDir = "conflicts/"

// Conflict is one kept loser of a write conflict.
type Conflict struct {
	Path   string // the file's path (data/PATH holds the winner)
	Key    string // where the loser's bytes are
	Writer string // namespace/pod/uid of the loser
	Size   int64
	MTime  string
	SHA256 string
}

// Conflicts lists the kept losers of write conflicts, in path order.
func Conflicts(ctx context.Context, st store.Store) ([]Conflict, error) {
	var out []Conflict
	for o, err := range st.List(ctx, ConflictsDir) {
		if err != nil {
			return nil, err
		}
		rest := o.Key[len(ConflictsDir):]
		i := len(rest) - 1
		for i >= 0 && rest[i] != '/' {
			i--
		}
		if i <= 0 {
			continue // not a conflict object
		}
		c := Conflict{Path: rest[:i], Key: o.Key, Size: o.Size}
		if info, err := st.Head(ctx, o.Key, store.HeadOptions{}); err == nil {
			c.Writer, c.MTime, c.SHA256 = info.Metadata["writer"], info.Metadata[snapshot.MetaMTime], info.Metadata[snapshot.MetaSHA256]
			if n, err := strconv.ParseInt(info.Metadata[snapshot.MetaSize], 10, 64); err == nil && info.Metadata[snapshot.MetaEncoding] != "" {
				c.Size = n // the content's size, not the encoded object's
			}
		}
		out = append(out, c)
	}
	return out, nil
}

// PrintConflicts writes the table of `restore conflicts`.
func PrintConflicts(w io.Writer, cs []Conflict) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PATH\tLOSER\tSIZE\tMTIME\tSHA256\tKEPT AT")
	for _, c := range cs {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", c.Path, c.Writer, c.Size, c.MTime, c.SHA256, c.Key)
	}
	tw.Flush()
}
