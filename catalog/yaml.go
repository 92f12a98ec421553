package catalog

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"
)

// decodeStrict decodes dec's next document into v, refusing fields v does
// not have, so a typo is not silently dropped. yaml names such a field's
// Go type ("field weigth not found in type catalog.Split"); the error
// says instead which fields can stand there.
func decodeStrict(dec *yaml.Decoder, v any) error {
	dec.KnownFields(true)
	err := dec.Decode(v)
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return err
	}
	known := map[string][]string{}
	yamlFields(reflect.TypeOf(v), known)
	msgs := make([]string, len(te.Errors))
	for i, m := range te.Errors {
		msgs[i] = m
		if g := unknownField.FindStringSubmatch(m); g != nil && known[g[3]] != nil {
			msgs[i] = fmt.Sprintf("%s: unknown field %q (the fields there: %s)", g[1], g[2], strings.Join(known[g[3]], ", "))
		}
	}
	return errors.New(strings.Join(msgs, "; "))
}

var unknownField = regexp.MustCompile(`^(line \d+): field (.+) not found in type (\S+)$`)

// yamlFields records the YAML field names of t's struct types and of those
// inside them, by the type's name as yaml's errors print it.
func yamlFields(t reflect.Type, known map[string][]string) {
	switch t.Kind() {
	case reflect.Pointer, reflect.Slice, reflect.Array, reflect.Map:
		yamlFields(t.Elem(), known)
	case reflect.Struct:
		if _, done := known[t.String()]; done {
			return // a type met before, or one that holds itself
		}
		known[t.String()] = nil
		var names []string
		for f := range t.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if !f.IsExported() || name == "-" {
				continue
			}
			if name == "" {
				name = strings.ToLower(f.Name)
			}
			names = append(names, name)
			yamlFields(f.Type, known)
		}
		known[t.String()] = names
	}
}
