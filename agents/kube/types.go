package kube

import (
	"time"

	"k8s.io/client-go/rest"
)

// The fields of the API objects this package sends and reads, as the API
// spells them in JSON. Unknown fields in responses are ignored.

type objectMeta struct {
	Name         string `json:"name,omitempty"`
	GenerateName string `json:"generateName,omitempty"`
	Namespace    string `json:"namespace,omitempty"`
	UID          string `json:"uid,omitempty"`
}

type objectReference struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	UID        string `json:"uid,omitempty"`
}

type eventSource struct {
	Component string `json:"component,omitempty"`
	Host      string `json:"host,omitempty"`
}

// event is core/v1 Event (the kind `kubectl describe pod` and `kubectl events` show).
type event struct {
	APIVersion          string          `json:"apiVersion"`
	Kind                string          `json:"kind"`
	Metadata            objectMeta      `json:"metadata"`
	InvolvedObject      objectReference `json:"involvedObject"`
	Reason              string          `json:"reason"`
	Message             string          `json:"message"`
	Type                string          `json:"type"`
	Count               int32           `json:"count"`
	FirstTimestamp      string          `json:"firstTimestamp,omitempty"`
	LastTimestamp       string          `json:"lastTimestamp,omitempty"`
	Source              eventSource     `json:"source"`
	ReportingController string          `json:"reportingComponent,omitempty"`
	ReportingInstance   string          `json:"reportingInstance,omitempty"`
}

type resourceAttributes struct {
	Namespace string `json:"namespace,omitempty"`
	Verb      string `json:"verb"`
	Resource  string `json:"resource"`
}

type accessReview struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Spec       struct {
		ResourceAttributes *resourceAttributes `json:"resourceAttributes,omitempty"`
	} `json:"spec"`
	Status struct {
		Allowed bool   `json:"allowed"`
		Reason  string `json:"reason,omitempty"`
	} `json:"status"`
}

// apiTime is metav1.Time's wire form (RFC 3339, whole seconds, UTC).
func apiTime(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// rawBody is Result.Raw with the API's Status decoded into the error (Raw
// alone returns a generic "unknown" error, losing Forbidden's message).
func rawBody(r rest.Result) ([]byte, error) {
	if err := r.Error(); err != nil {
		return nil, err
	}
	return r.Raw()
}
