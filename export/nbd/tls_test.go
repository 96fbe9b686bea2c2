package nbd

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
	"github.com/imgloop/imgloop/internal/tlstest"
)

// TestTLS serves an image over TLS (with and without client
// certificates, with and without TLSRequired) to qemu-img, qemu-io and
// nbdinfo, which use GnuTLS, and checks what plain clients get.
func TestTLS(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io", "nbdinfo")
	pki := tlstest.New(t)
	dir := t.TempDir()
	src := makeQcow2(t, dir, "16M")
	want := qemutest.RawBytes(t, src)
	tlsObject := "tls-creds-x509,id=tls0,endpoint=client,dir=" + pki.Dir
	for _, tc := range []struct {
		name          string
		verifyClients bool
		required      bool
	}{
		{"optional", false, false},
		{"required", false, true},
		{"client certificates", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := openImage(t, src, "qcow2", true)
			s := startServer(t, []Export{{Name: "tls", Description: "over TLS", Image: img}},
				Options{TLS: pki.ServerConfig(t, tc.verifyClients), TLSRequired: tc.required})
			opts := "driver=nbd,path=" + s.sock + ",export=tls,tls-creds=tls0,tls-hostname=localhost"

			// qemu-img convert over TLS reads what qemu-img reads.
			out := filepath.Join(t.TempDir(), "out.raw")
			qemutest.Img(t, "convert", "--object", tlsObject, "--image-opts", opts, "-O", "raw", out)
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("TLS read differs from qemu-img convert at %d", qemutest.FirstDiff(got, want))
			}

			// nbdinfo: the certificates directory of libnbd.
			info := qemutest.Run(t, "nbdinfo", "nbds+unix:///tls?socket="+s.sock+"&tls-certificates="+pki.Dir)
			if !strings.Contains(info, "over TLS") || !strings.Contains(info, "with TLS") {
				t.Errorf("nbdinfo over TLS:\n%s", info)
			}

			// A plain client: refused when TLS is required, served
			// otherwise.
			_, err = qemutest.Try("qemu-img", "info", "--output=json", s.uri("tls"))
			if tc.required && err == nil {
				t.Error("plain qemu-img info served with TLS required")
			}
			if !tc.required && err != nil {
				t.Errorf("plain qemu-img info with optional TLS: %v", err)
			}

			// A TLS client that does not trust the server's CA fails.
			other := tlstest.New(t)
			_, err = qemutest.Try("qemu-img", "info", "--object",
				"tls-creds-x509,id=tls0,endpoint=client,dir="+other.Dir, "--image-opts", opts)
			if err == nil {
				t.Error("qemu-img trusting another CA was served")
			}
		})
	}
}

// TestTLSWrites writes over TLS with qemu-io and checks the image.
func TestTLSWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	pki := tlstest.New(t)
	p := filepath.Join(t.TempDir(), "w.qcow2")
	qemutest.Create(t, p, "qcow2", "", "4M")
	img := openImage(t, p, "qcow2", false)
	s := startServer(t, []Export{{Image: img}}, Options{TLS: pki.ServerConfig(t, true), TLSRequired: true})
	cmd := exec.Command("qemu-io", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+pki.Dir,
		"--image-opts", "driver=nbd,path="+s.sock+",tls-creds=tls0,tls-hostname=localhost",
		"-c", "write -P 0x5a 64k 192k", "-c", "write -z 1M 64k", "-c", "flush", "-c", "read -P 0x5a 64k 192k")
	if out, err := cmd.CombinedOutput(); err != nil || strings.Contains(string(out), "error") {
		t.Fatalf("qemu-io over TLS: %v\n%s", err, out)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 192<<10)
	if _, err := img.ReadAt(buf, 64<<10); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, bytes.Repeat([]byte{0x5a}, len(buf))) {
		t.Fatal("data written over TLS did not reach the image")
	}
}
