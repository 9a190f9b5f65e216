//go:build bench

package bench

import "os"

// benchS3 is the S3 server the restore and syncer benchmarks run on:
// versitygw (the reference) unless BENCH_S3=minio: a second server
// with another request path and storage layout, to tell what is the agents'
// cost and what is the server's.
func benchS3() string {
	if k := os.Getenv("BENCH_S3"); k != "" {
		return k
	}
	return "versitygw"
}
