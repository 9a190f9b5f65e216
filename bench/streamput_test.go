//go:build bench

// Memory of a streamed Put on S3 (issue 16): the syncer's checkpoint of a
// 1 000 000-file prefix is a ~48 MiB gzip stream, uploaded through the
// transfer manager, which copies every part in flight into a buffer of its
// own. Prints the peak heap in use while a 48 MiB stream goes to versitygw
// (BENCH_S3=minio for MinIO).
package bench

import (
	"context"
	"io"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/s3"
	"github.com/podkeeper/podkeeper/test/peers"
)

// randStream is n pseudo-random bytes, produced as they are read.
type randStream struct {
	n int64
	r *rand.ChaCha8
}

func (r *randStream) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.n {
		p = p[:r.n]
	}
	r.r.Read(p)
	r.n -= int64(len(p))
	return len(p), nil
}

func TestBenchStreamedPut(t *testing.T) {
	srv := peers.StartS3(t, benchS3())
	ctx := context.Background()
	st, err := s3.New(ctx, srv.StoreConfig(t, "streamput"), nil)
	if err != nil {
		t.Fatal(err)
	}
	const size = 48 << 20
	for round := range benchRounds() {
		runtime.GC()
		var peak atomic.Uint64
		done := make(chan struct{})
		stopped := make(chan struct{})
		go func() {
			defer close(stopped)
			var m runtime.MemStats
			for {
				runtime.ReadMemStats(&m)
				peak.Store(max(peak.Load(), m.HeapInuse))
				select {
				case <-done:
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		}()
		start := time.Now()
		body := &randStream{n: size, r: rand.NewChaCha8([32]byte{byte(round)})}
		if _, err := st.Put(ctx, "big", body, size, store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
		close(done)
		<-stopped
		t.Logf("round %d: 48 MiB streamed Put on %s: peak heap in use %d MiB, %v", round+1, benchS3(), peak.Load()>>20, time.Since(start).Round(time.Millisecond))
	}
}
