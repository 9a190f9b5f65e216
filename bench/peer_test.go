//go:build bench

package bench

import "os"

// benchS3 is the S3 server the restore and syncer benchmarks run on:
// versitygw (the reference) unless BENCH_S3=minio. versitygw closes
// the connection after every response, so each request pays a TCP connect;
// MinIO keeps connections alive, which shows what the agents cost when the
// server's request path is not the bottleneck.
func benchS3() string {
	if k := os.Getenv("BENCH_S3"); k != "" {
		return k
	}
	return "versitygw"
}
