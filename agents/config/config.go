// Package config loads an agent's configuration from environment variables.
//
// Each agent describes its variables as a struct with tags:
//
//	env:"NAME"        the variable (caarlos0/env syntax, e.g. env:"NAME,required")
//	envDefault:"v"    the default
//	help:"text"       one line for --help and the tables in docs/
//	enum:"a|b|c"      the only values allowed (checked before the agent's own Validate)
//	defaultHelp:"t"   what --help shows as the default when it is computed, not fixed
//
// Load reports every bad value at once, each naming the variable, the value and
// what is allowed, so an operator fixes a Pod spec in one round trip instead of one
// per variable.
package config

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/caarlos0/env/v11"
)

// FieldError is one bad variable.
type FieldError struct {
	Var     string
	Value   string
	Problem string
}

func (e FieldError) Error() string {
	return fmt.Sprintf("%s=%q: %s", e.Var, e.Value, e.Problem)
}

// Error collects every FieldError of one Load. Agents exit with code 2 on it.
type Error struct {
	Errors []FieldError
}

func (e *Error) Error() string {
	lines := make([]string, 0, len(e.Errors)+1)
	lines = append(lines, fmt.Sprintf("invalid configuration (%d problem(s)):", len(e.Errors)))
	for _, fe := range e.Errors {
		lines = append(lines, "  "+fe.Error())
	}
	return strings.Join(lines, "\n")
}

// Add records a problem with variable name whose raw value is value. A
// user-info part of the value (KEY:SECRET@ of a URL or HOST:PORT) is never
// kept, neither in the value nor quoted in the problem: whatever variable
// carries a credential, its refusal does not print it.
func (e *Error) Add(name, value, format string, args ...any) {
	problem := fmt.Sprintf(format, args...)
	if shown := RedactURL(value); shown != value {
		if info := userInfo(value); info != "" {
			problem = strings.ReplaceAll(problem, info, "xxxxx")
		}
		value = shown
	}
	e.Errors = append(e.Errors, FieldError{Var: name, Value: value, Problem: problem})
}

// Has reports whether a problem was already recorded for name, so dependent checks
// do not pile a second message on a value that is already known to be wrong.
func (e *Error) Has(name string) bool {
	return slices.ContainsFunc(e.Errors, func(fe FieldError) bool { return fe.Var == name })
}

// Err returns e when it holds problems, nil otherwise.
func (e *Error) Err() error {
	if len(e.Errors) == 0 {
		return nil
	}
	return e
}

// Validator is implemented by config structs (and embedded parts of them) with
// checks beyond type and enum. env holds the raw environment for messages.
type Validator interface {
	Validate(env Env, errs *Error)
}

// Env is the environment a configuration was loaded from.
type Env map[string]string

// Get returns the raw value of name ("" when unset).
func (e Env) Get(name string) string { return e[name] }

// Var describes one variable of a config struct.
type Var struct {
	Name     string
	Default  string
	Help     string
	Required bool
	Enum     []string
	Type     string
	field    string
}

// Vars lists the variables of cfg (a pointer to a struct or a struct) in
// declaration order, embedded and nested structs included.
func Vars(cfg any) []Var {
	t := reflect.TypeOf(cfg)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	var out []Var
	collect(t, &out)
	return out
}

func collect(t reflect.Type, out *[]Var) {
	for i := range t.NumField() {
		f := t.Field(i)
		tag, ok := f.Tag.Lookup("env")
		if !ok {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				collect(ft, out)
			}
			continue
		}
		parts := strings.Split(tag, ",")
		v := Var{Name: parts[0], Default: f.Tag.Get("envDefault"), Help: f.Tag.Get("help"), field: f.Name, Type: typeName(f.Type)}
		if d, ok := f.Tag.Lookup("defaultHelp"); ok {
			v.Default = d
		}
		v.Required = slices.Contains(parts[1:], "required") || slices.Contains(parts[1:], "notEmpty")
		if e := f.Tag.Get("enum"); e != "" {
			v.Enum = strings.Split(e, "|")
		}
		*out = append(*out, v)
	}
}

func typeName(t reflect.Type) string {
	switch {
	case t.Kind() == reflect.Pointer:
		return typeName(t.Elem())
	case t.String() == "time.Duration":
		return "duration"
	case t.Kind() == reflect.Slice:
		return "list"
	}
	return t.Kind().String()
}

// Load fills cfg (a pointer to a struct) from environ, then checks enums and runs
// every Validator found in cfg (embedded parts first). It returns *Error listing
// every problem.
func Load(cfg any, environ Env) error {
	vars := Vars(cfg)
	byField := map[string]Var{}
	for _, v := range vars {
		byField[v.field] = v
	}
	errs := &Error{}
	perr := env.ParseWithOptions(cfg, env.Options{Environment: environ})
	if perr != nil {
		var agg env.AggregateError
		list := []error{perr}
		if errors.As(perr, &agg) {
			list = agg.Errors
		}
		for _, e := range list {
			name, problem := "", e.Error()
			var pe env.ParseError
			var ne env.VarIsNotSetError
			var ee env.EmptyVarError
			switch {
			case errors.As(e, &pe):
				v := byField[pe.Name]
				name, problem = v.Name, fmt.Sprintf("not a valid %s (%v)", v.Type, unwrapParse(pe.Err))
				if v.Type == "duration" {
					problem = "not a valid duration; use a number with a unit, e.g. 500ms, 10s, 1m"
				}
			case errors.As(e, &ne):
				name, problem = ne.Key, "is required"
			case errors.As(e, &ee):
				name, problem = ee.Key, "must not be empty"
			}
			if name == "" {
				return fmt.Errorf("config: %w", e) // a programming error in the struct, not bad input
			}
			errs.Add(name, environ.Get(name), "%s", problem)
		}
	}
	for _, v := range vars {
		if len(v.Enum) == 0 || errs.Has(v.Name) {
			continue
		}
		raw, set := environ[v.Name]
		if !set {
			continue
		}
		if !slices.Contains(v.Enum, raw) {
			errs.Add(v.Name, raw, "must be one of %s", quoteList(v.Enum))
		}
	}
	validate(reflect.ValueOf(cfg), environ, errs)
	return errs.Err()
}

func unwrapParse(err error) error {
	for {
		u := errors.Unwrap(err)
		if u == nil {
			return err
		}
		err = u
	}
}

// validate runs Validators depth-first so shared parts are checked before the
// agent's own rules, which may rely on them.
func validate(v reflect.Value, environ Env, errs *Error) {
	for v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return
		}
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return
	}
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if _, ok := f.Tag.Lookup("env"); ok || !f.IsExported() {
			continue
		}
		fv := v.Field(i)
		if fv.Kind() == reflect.Struct || (fv.Kind() == reflect.Pointer && fv.Type().Elem().Kind() == reflect.Struct) {
			validate(fv, environ, errs)
		}
	}
	if v.CanAddr() {
		if val, ok := v.Addr().Interface().(Validator); ok {
			val.Validate(environ, errs)
		}
	}
}

func quoteList(vals []string) string {
	q := make([]string, len(vals))
	for i, s := range vals {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, ", ")
}
