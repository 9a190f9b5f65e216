package config

import (
	"crypto/x509"
	"errors"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

// Base holds the variables every agent reads. Agents include it as a named
// field (not embedded) so its Validate is not promoted onto theirs.
type Base struct {
	PodName      string `env:"POD_NAME" help:"Name of this Pod (downward API: metadata.name). Used in records, leases and snapshots."`
	PodNamespace string `env:"POD_NAMESPACE" help:"Namespace of this Pod (downward API: metadata.namespace)."`
	PodUID       string `env:"POD_UID" help:"UID of this Pod (downward API: metadata.uid). Names the Pod in Kubernetes Events, with POD_NAME and POD_NAMESPACE."`
	NodeName     string `env:"NODE_NAME" help:"Node this Pod runs on (downward API: spec.nodeName). The source host of Kubernetes Events."`
	LogLevel     string `env:"LOG_LEVEL" envDefault:"info" enum:"debug|info|warn|error" help:"Minimum level of the agent's own log."`
	LogFormat    string `env:"LOG_FORMAT" envDefault:"json" enum:"json|text" help:"Format of the agent's own log on stderr."`
	KubeEvents   string `env:"KUBE_EVENTS" envDefault:"auto" enum:"auto|true|false" help:"Post Kubernetes Events on this Pod: auto = when running in a cluster, true = required (error at start if the API is unreachable or forbidden), false = never."`
}

// Store holds the variables that select and reach the object store.
type Store struct {
	URL         string `env:"STORE_URL,required" help:"Where snapshots and data live: s3://BUCKET/PREFIX or file:///ABS/PATH."`
	S3Endpoint  string `env:"S3_ENDPOINT" help:"S3 endpoint URL for non-AWS servers (MinIO, versitygw, Ceph...). Empty = AWS."`
	S3Region    string `env:"S3_REGION" envDefault:"us-east-1" help:"S3 region."`
	S3PathStyle *bool  `env:"S3_PATH_STYLE" defaultHelp:"true if S3_ENDPOINT is set" help:"Path-style addressing (http://host/bucket/key)."`
	S3CAFile    string `env:"S3_CA_FILE" help:"PEM file with extra CA certificates trusted for the S3 endpoint."`
	S3SSE       string `env:"S3_SSE" enum:"|AES256|aws:kms" help:"Server-side encryption for objects written."`
	S3KMSKeyID  string `env:"S3_SSE_KMS_KEY_ID" help:"KMS key id for S3_SSE=aws:kms (empty = the bucket's default key)."`

	// Filled by Validate from URL.
	Scheme string `json:"-"`
	Bucket string `json:"-"`
	Prefix string `json:"-"` // no leading or trailing slash; "" = bucket root
	Path   string `json:"-"` // file:// root
}

// PathStyle resolves S3_PATH_STYLE's computed default.
func (s *Store) PathStyle() bool {
	if s.S3PathStyle != nil {
		return *s.S3PathStyle
	}
	return s.S3Endpoint != ""
}

// bucketRe follows the S3 bucket naming rules (3-63 chars, lowercase, digits, dots, hyphens).
var bucketRe = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$`)

func (s *Store) Validate(env Env, errs *Error) {
	if s.URL != "" && !errs.Has("STORE_URL") {
		s.parseURL(errs)
	}
	if s.S3Endpoint != "" {
		u, err := url.Parse(s.S3Endpoint)
		switch {
		case userInfo(s.S3Endpoint) != "" || err == nil && u.User != nil:
			errs.Add("S3_ENDPOINT", s.S3Endpoint, "must not carry credentials; they come from the S3 Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never the URL")
		case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
			errs.Add("S3_ENDPOINT", s.S3Endpoint, "must be an http:// or https:// URL with a host, e.g. http://minio:9000")
		}
	}
	if s.S3CAFile != "" {
		pem, err := os.ReadFile(s.S3CAFile)
		switch {
		case err != nil:
			errs.Add("S3_CA_FILE", s.S3CAFile, "cannot be read: %v", err)
		case !x509.NewCertPool().AppendCertsFromPEM(pem):
			errs.Add("S3_CA_FILE", s.S3CAFile, "holds no PEM certificate")
		}
	}
	if s.S3KMSKeyID != "" && s.S3SSE != "aws:kms" {
		errs.Add("S3_SSE_KMS_KEY_ID", s.S3KMSKeyID, "is only used with S3_SSE=aws:kms (S3_SSE is %q)", s.S3SSE)
	}
	if s.S3Region == "" {
		errs.Add("S3_REGION", "", "must not be empty")
	}
}

// RedactURL hides the user-info part of a URL-like value ("s3://KEY:SECRET@b/p"
// -> "s3://xxxxx@b/p", "KEY:SECRET@host:24224" -> "xxxxx@host:24224"), also
// when the value does not parse: a value refused for carrying credentials
// must not print them in the refusal.
func RedactURL(v string) string {
	info := userInfo(v)
	if info == "" {
		return v
	}
	i := strings.Index(v, info)
	return v[:i] + "xxxxx" + v[i+len(info):]
}

// userInfo is the user-info part of v (before the last '@' of a URL's
// authority, or of a scheme-less value whose part before the '@' holds a
// ':'), "" when there is none.
func userInfo(v string) string {
	rest := v
	if i := strings.Index(v, "://"); i >= 0 {
		rest = v[i+3:]
	}
	at := strings.LastIndex(rest, "@")
	if at <= 0 {
		return ""
	}
	if rest == v && !strings.Contains(rest[:at], ":") {
		return "" // "name@host", a path with an '@': no password
	}
	return rest[:at]
}

func (s *Store) parseURL(errs *Error) {
	shown := RedactURL(s.URL)
	u, err := url.Parse(s.URL)
	if err != nil {
		// url.Error repeats the raw value, and its reason may quote a piece of
		// the user-info (an "invalid port" that is half a secret).
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if shown != s.URL {
			err = errors.New("it carries user-info; credentials come from the S3 Secret, never the URL")
		}
		errs.Add("STORE_URL", shown, "is not a URL (%v); use s3://BUCKET/PREFIX or file:///ABS/PATH", err)
		return
	}
	s.Scheme = u.Scheme
	switch u.Scheme {
	case "s3":
		if !bucketRe.MatchString(u.Host) || strings.Contains(u.Host, "..") {
			errs.Add("STORE_URL", shown, "bucket %q is not a valid S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)", u.Host)
			return
		}
		if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
			errs.Add("STORE_URL", shown, "must not carry credentials, a query or a fragment; use s3://BUCKET/PREFIX")
			return
		}
		s.Bucket = u.Host
		p := strings.Trim(u.Path, "/")
		for _, el := range strings.Split(p, "/") {
			if p != "" && (el == "" || el == "." || el == "..") {
				errs.Add("STORE_URL", shown, "prefix %q must not contain empty, '.' or '..' elements", p)
				return
			}
		}
		s.Prefix = p
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			errs.Add("STORE_URL", shown, "file URLs must be file:///ABS/PATH (three slashes), not a host %q", u.Host)
			return
		}
		if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) == "/" {
			errs.Add("STORE_URL", shown, "file URLs need an absolute path other than /, e.g. file:///var/lib/podkeeper")
			return
		}
		s.Path = filepath.Clean(u.Path)
	default:
		errs.Add("STORE_URL", shown, "scheme must be s3:// or file://")
	}
}

// NotWritable is the error for a directory an agent must write and may not:
// a configuration error (exit 2) naming the variable, saying whom the agent
// runs as and the usual fix, instead of a bare "permission denied".
func NotWritable(variable, path string, err error) error {
	groups, _ := os.Getgroups()
	e := &Error{}
	e.Add(variable, path, "is not writable by this agent (uid %d, gid %d, groups %v): %v; the agents run as their own user "+
		"(65532 in podkeeper's manifests): give them write access with the Pod's fsGroup or a group-writable volume "+
		"(docs/kubernetes.md, \"Users, groups, fsGroup\")", os.Getuid(), os.Getgid(), groups, err)
	return e
}

// IsNotWritable reports whether err is a refusal to write (permissions, a
// read-only filesystem) rather than a fault.
func IsNotWritable(err error) bool {
	return errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS)
}
