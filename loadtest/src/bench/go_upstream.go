// A stand-in for kube-apiserver's transport: Go's net/http TLS server
// (HTTP/2 and HTTP/1.1 by ALPN, the standard library's own HTTP/2 server
// with its defaults, 250 streams) answering the overhead benchmark's GET
// with the bytes kube-sim served for it, and the headers the apiserver
// sends. Built and run by loadtest/src/bench/go_upstream.rs; used only by
// `loadtest bench overhead --upstream go`, never by tests.
//
// Usage: standin CERT KEY TOKEN_FILE PATH BODY_FILE SSR_BODY_FILE
package main

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
)

func uuid() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

const unauthorized = `{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}`
const notFound = `{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"not found","reason":"NotFound","code":404}`

func main() {
	if len(os.Args) != 7 {
		fmt.Fprintln(os.Stderr, "usage: standin CERT KEY TOKEN_FILE PATH BODY_FILE SSR_BODY_FILE")
		os.Exit(2)
	}
	cert, key, path := os.Args[1], os.Args[2], os.Args[4]
	read := func(p string) []byte {
		b, err := os.ReadFile(p)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return b
	}
	want := "Bearer " + strings.TrimSpace(string(read(os.Args[3])))
	body, ssr := read(os.Args[5]), read(os.Args[6])
	flowSchema, priorityLevel := uuid(), uuid()
	var gets atomic.Uint64

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/__gets" {
			fmt.Fprint(w, gets.Load())
			return
		}
		h := w.Header()
		h.Set("Audit-Id", uuid())
		h.Set("Cache-Control", "no-cache, private")
		h.Set("Content-Type", "application/json")
		if r.Header.Get("Authorization") != want {
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(unauthorized))
			return
		}
		h.Set("X-Kubernetes-Pf-Flowschema-Uid", flowSchema)
		h.Set("X-Kubernetes-Pf-Prioritylevel-Uid", priorityLevel)
		switch {
		case r.Method == http.MethodGet && r.URL.Path == path:
			gets.Add(1)
			w.Write(body)
		case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/selfsubjectreviews"):
			w.WriteHeader(http.StatusCreated)
			w.Write(ssr)
		default:
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(notFound))
		}
	})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// The readiness line loadtest waits for.
	fmt.Printf("go-standin: listening on %s\n", ln.Addr())
	srv := &http.Server{Handler: handler}
	// ServeTLS with no TLSConfig of ours enables HTTP/2 (ALPN h2).
	fmt.Fprintln(os.Stderr, srv.ServeTLS(ln, cert, key))
	os.Exit(1)
}
