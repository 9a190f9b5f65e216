//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/test/peers"
)

// follower streams one container's log with kubelet timestamps (`kubectl logs -f
// --timestamps`) from before an event until the container ends: the only way to keep the
// last lines of a Pod that is being deleted, whose logs vanish with it.
type follower struct {
	peers.LockedBuffer
	done chan struct{}
}

func (n *ns) follow(pod, container string) *follower {
	f := &follower{done: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	cmd := exec.CommandContext(ctx, kubectlBin(), "-n", n.name, "logs", "-f", "--timestamps", "--since=1s", pod, "-c", container)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		cancel()
		n.t.Fatalf("kubectl logs -f: %v", err)
	}
	go func() { cmd.Wait(); cancel(); close(f.done) }()
	n.t.Cleanup(cancel)
	return f
}

// wait returns once the container's log stream has ended (the container stopped).
func (f *follower) wait(t *testing.T, timeout time.Duration) string {
	t.Helper()
	select {
	case <-f.done:
	case <-time.After(timeout):
		t.Errorf("log stream still open after %s", timeout)
	}
	return f.String()
}

// firstAt returns the kubelet timestamp of the first line matching re.
func firstAt(log string, re *regexp.Regexp) (time.Time, bool) {
	for _, l := range strings.Split(log, "\n") {
		ts, rest, ok := strings.Cut(l, " ")
		if !ok || !re.MatchString(rest) {
			continue
		}
		if at, err := time.Parse(time.RFC3339Nano, ts); err == nil {
			return at, true
		}
	}
	return time.Time{}, false
}

// objects lists every key under prefix with its ETag and modification time.
type object struct {
	ETag     string
	Modified time.Time
	Size     int64
}

func listObjects(t *testing.T, s *peers.S3Server, bucket, prefix string) map[string]object {
	t.Helper()
	out := map[string]object{}
	p := s3.NewListObjectsV2Paginator(s.Client(), &s3.ListObjectsV2Input{Bucket: aws.String(bucket), Prefix: aws.String(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			t.Fatalf("list %s: %v", prefix, err)
		}
		for _, o := range page.Contents {
			out[aws.ToString(o.Key)] = object{ETag: aws.ToString(o.ETag), Modified: aws.ToTime(o.LastModified), Size: aws.ToInt64(o.Size)}
		}
	}
	return out
}

func keysWithPrefix(m map[string]object, prefix string) []string {
	var ks []string
	for k := range m {
		if strings.HasPrefix(k, prefix) {
			ks = append(ks, strings.TrimPrefix(k, prefix))
		}
	}
	sort.Strings(ks)
	return ks
}

// pathsOf returns the paths of "SUM  PATH" lines.
func pathsOf(sums []string) []string {
	var ps []string
	for _, s := range sums {
		ps = append(ps, s[66:])
	}
	sort.Strings(ps)
	return ps
}

func diff(got, want []string) string {
	g, w := map[string]bool{}, map[string]bool{}
	for _, s := range got {
		g[s] = true
	}
	for _, s := range want {
		w[s] = true
	}
	var missing, extra []string
	for _, s := range want {
		if !g[s] {
			missing = append(missing, s)
		}
	}
	for _, s := range got {
		if !w[s] {
			extra = append(extra, s)
		}
	}
	if len(missing) == 0 && len(extra) == 0 {
		return ""
	}
	return fmt.Sprintf("missing %d %v; unexpected %d %v", len(missing), head(missing), len(extra), head(extra))
}

func head(s []string) []string {
	if len(s) > 5 {
		return append(s[:5:5], "...")
	}
	return s
}
