package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd"
)

// serveFlags are imgloop serve's options.
type serveFlags struct {
	format       string
	readOnly     bool
	sockets      []string
	listens      []string
	names        []string
	descriptions []string
	tlsCert      string
	tlsKey       string
	tlsCA        string
	tlsRequired  bool
	maxClients   int
	pidfile      string
	fork         bool
	oneshot      bool
	verbose      bool
}

// defaultNBDAddr is where serve listens when given no socket: the NBD
// port on the loopback interface only.
const defaultNBDAddr = "127.0.0.1:10809"

// readyFDEnv names the environment variable telling a --fork child which
// inherited file descriptor reports its readiness to the parent.
const readyFDEnv = "IMGLOOP_SERVE_READY_FD"

func newServeCmd() *cobra.Command {
	var f serveFlags
	cmd := &cobra.Command{
		Use:   "serve [flags] IMAGE...",
		Short: "Serve images over NBD (like qemu-nbd)",
		Long: "serve exports each IMAGE over the network block device protocol, to\n" +
			"QEMU (-drive file=nbd+unix:///NAME?socket=PATH), qemu-img, nbdinfo,\n" +
			"nbdcopy, nbd-client and any other NBD client, until SIGINT or SIGTERM\n" +
			"(or, with --oneshot, the first client's disconnection). Every\n" +
			"connection to an export shares one open image, so multi-connection\n" +
			"clients are safe (NBD_FLAG_CAN_MULTI_CONN).\n\n" +
			"It listens on each --socket (unix) and --listen (TCP HOST[:PORT],\n" +
			"port 10809 by default); with neither, on TCP " + defaultNBDAddr + ", or\n" +
			"on the sockets systemd passes (LISTEN_FDS). It prints each export's\n" +
			"URI once it accepts connections.\n\n" +
			"Export names: --name once per IMAGE, in order; with one IMAGE and no\n" +
			"--name the export is the default one (\"\"), with several each is named\n" +
			"after its file's base name. --description likewise.\n\n" +
			"Images are locked as QEMU locks them: read-write (the default) refuses\n" +
			"an image another process uses, -r shares it with other readers.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runServe(cmd.Context(), f, args, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	addFormatFlag(cmd, &f.format)
	fl.BoolVarP(&f.readOnly, "read-only", "r", false, "export read-only")
	fl.StringArrayVarP(&f.sockets, "socket", "k", nil, "listen on the unix socket `PATH` (repeatable)")
	fl.StringArrayVar(&f.listens, "listen", nil, "listen on TCP `HOST[:PORT]` (repeatable; port 10809 by default)")
	fl.StringArrayVarP(&f.names, "name", "x", nil, "export `NAME` (once per image, in order)")
	fl.StringArrayVarP(&f.descriptions, "description", "D", nil, "export description `TEXT` (once per image, in order)")
	fl.StringVar(&f.tlsCert, "tls-cert", "", "serve TLS with the certificate `FILE` (PEM)")
	fl.StringVar(&f.tlsKey, "tls-key", "", "private key `FILE` (PEM) of --tls-cert")
	fl.StringVar(&f.tlsCA, "tls-ca", "", "require client certificates signed by the CA in `FILE` (PEM)")
	fl.BoolVar(&f.tlsRequired, "tls-required", false, "refuse clients that do not start TLS")
	fl.IntVarP(&f.maxClients, "max-clients", "e", 0, "serve at most `N` connections at once (default 256)")
	fl.StringVar(&f.pidfile, "pidfile", "", "write the server's process ID to `FILE`")
	fl.BoolVar(&f.fork, "fork", false, "serve from a background process; return once it accepts connections")
	fl.BoolVarP(&f.oneshot, "oneshot", "1", false, "exit after the first client disconnects")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log connection problems on stderr")
	return cmd
}

// exportNames returns the export names and descriptions for images.
func (f serveFlags) exportNames(images []string) (names, descs []string, err error) {
	perImage := func(flag string, given []string, def func(int) string) ([]string, error) {
		switch {
		case len(given) == len(images):
			return given, nil
		case len(given) == 0:
			out := make([]string, len(images))
			for i := range out {
				out[i] = def(i)
			}
			return out, nil
		}
		return nil, fmt.Errorf("--%s given %d times for %d images (give it once per image, in order)", flag, len(given), len(images))
	}
	names, err = perImage("name", f.names, func(i int) string {
		if len(images) == 1 {
			return ""
		}
		return filepath.Base(images[i])
	})
	if err != nil {
		return nil, nil, err
	}
	descs, err = perImage("description", f.descriptions, func(int) string { return "" })
	return names, descs, err
}

// tlsConfig returns the TLS configuration the flags ask for, nil for none.
func (f serveFlags) tlsConfig() (*tls.Config, error) {
	switch {
	case f.tlsCert == "" && f.tlsKey == "":
		if f.tlsCA != "" || f.tlsRequired {
			return nil, errors.New("--tls-ca and --tls-required need --tls-cert and --tls-key")
		}
		return nil, nil
	case f.tlsCert == "" || f.tlsKey == "":
		return nil, errors.New("--tls-cert and --tls-key go together")
	}
	cert, err := tls.LoadX509KeyPair(f.tlsCert, f.tlsKey)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate %s, key %s: %w", f.tlsCert, f.tlsKey, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if f.tlsCA != "" {
		pem, err := os.ReadFile(f.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", f.tlsCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// listener is one socket served, with how clients reach it.
type listener struct {
	net.Listener
	unixPath string // the socket file to remove at exit, "" if not ours
	uriBase  string // "nbd+unix://" or "nbd://HOST:PORT"
	query    string // "?socket=PATH" for unix sockets
}

// uri returns the NBD URI of export name on l.
func (l listener) uri(name string, tls bool) string {
	base := l.uriBase
	if tls {
		base = strings.Replace(base, "nbd", "nbds", 1)
	}
	return base + "/" + (&url.URL{Path: name}).EscapedPath() + l.query
}

// listen opens the sockets the flags (or systemd) give.
func (f serveFlags) listen() ([]listener, error) {
	var ls []listener
	fail := func(err error) ([]listener, error) {
		for _, l := range ls {
			l.Close()
		}
		return nil, err
	}
	activated, err := activationListeners()
	if err != nil {
		return nil, err
	}
	if len(activated) > 0 {
		if len(f.sockets)+len(f.listens) > 0 {
			for _, l := range activated {
				l.Close()
			}
			return nil, errors.New("--socket and --listen cannot be used with socket activation (LISTEN_FDS)")
		}
		for _, l := range activated {
			ls = append(ls, describeListener(l, ""))
		}
		return ls, nil
	}
	listens := f.listens
	if len(f.sockets) == 0 && len(listens) == 0 {
		listens = []string{defaultNBDAddr}
	}
	for _, path := range f.sockets {
		l, err := listenUnix(path)
		if err != nil {
			return fail(err)
		}
		ls = append(ls, describeListener(l, path))
	}
	for _, addr := range listens {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(strings.Trim(addr, "[]"), "10809")
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fail(err)
		}
		ls = append(ls, describeListener(l, ""))
	}
	return ls, nil
}

// describeListener returns l with its URI parts; unixPath is the socket
// file serve made (removed at exit).
func describeListener(l net.Listener, unixPath string) listener {
	out := listener{Listener: l, unixPath: unixPath}
	switch a := l.Addr().(type) {
	case *net.UnixAddr:
		out.uriBase, out.query = "nbd+unix://", "?socket="+a.Name
	case *net.TCPAddr:
		out.uriBase = "nbd://" + a.String()
	default:
		out.uriBase = "nbd://" + l.Addr().String()
	}
	return out
}

// listenUnix listens on path, replacing a stale socket file nobody
// listens on (as qemu-nbd does) but never a live one or another file.
func listenUnix(path string) (net.Listener, error) {
	l, err := net.Listen("unix", path)
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		return l, err
	}
	if fi, serr := os.Lstat(path); serr != nil || fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("%s: exists and is not a socket", path)
	}
	if c, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
		c.Close()
		return nil, fmt.Errorf("%s: another server listens on it", path)
	}
	os.Remove(path)
	return net.Listen("unix", path)
}

// activationListeners returns the sockets systemd passed (LISTEN_PID,
// LISTEN_FDS: file descriptors 3 and on), none without them.
func activationListeners() ([]net.Listener, error) {
	pid, fds := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS")
	if pid == "" || fds == "" || pid != strconv.Itoa(os.Getpid()) {
		return nil, nil
	}
	n, err := strconv.Atoi(fds)
	if err != nil || n < 1 || n > 64 {
		return nil, fmt.Errorf("LISTEN_FDS=%q: want a count of sockets from 1 to 64", fds)
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	var ls []net.Listener
	for fd := 3; fd < 3+n; fd++ {
		syscall.CloseOnExec(fd)
		file := os.NewFile(uintptr(fd), "LISTEN_FD_"+strconv.Itoa(fd))
		l, err := net.FileListener(file)
		file.Close()
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("socket activation: file descriptor %d: %w", fd, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// runServe serves images until a signal (or --oneshot's disconnection).
func runServe(ctx context.Context, f serveFlags, images []string, stdout, stderr io.Writer) error {
	if f.fork && os.Getenv(readyFDEnv) == "" {
		return forkServe(stdout)
	}
	ready := readyPipe()
	err := serve(ctx, f, images, stdout, stderr, ready)
	if err != nil && ready != nil {
		fmt.Fprintf(ready, "error %s\n", oneLine(err.Error()))
	}
	return err
}

// readyPipe returns the --fork child's readiness pipe, nil if none.
func readyPipe() *os.File {
	s := os.Getenv(readyFDEnv)
	if s == "" {
		return nil
	}
	os.Unsetenv(readyFDEnv)
	fd, err := strconv.Atoi(s)
	if err != nil || fd < 3 {
		return nil
	}
	return os.NewFile(uintptr(fd), "ready")
}

// serve is serve's work in the serving process. ready, if not nil, gets
// the URIs and "ok" once the sockets accept connections.
func serve(ctx context.Context, f serveFlags, images []string, stdout, stderr io.Writer, ready *os.File) (err error) {
	names, descs, err := f.exportNames(images)
	if err != nil {
		return err
	}
	tlsCfg, err := f.tlsConfig()
	if err != nil {
		return err
	}
	var imgs []disk.Image
	defer func() {
		for i, img := range imgs {
			if cerr := img.Close(); cerr != nil && err == nil {
				err = fmt.Errorf("%s: %w", images[i], cerr)
			}
		}
	}()
	exports := make([]nbd.Export, len(images))
	for i, path := range images {
		img, err := disk.Open(path, disk.OpenOptions{Format: f.format, ReadOnly: f.readOnly})
		if err != nil {
			return err
		}
		imgs = append(imgs, img)
		exports[i] = nbd.Export{Name: names[i], Description: descs[i], Image: img, ReadOnly: f.readOnly}
	}

	ctx, stopSignals := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stopSignals()
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	opts := nbd.Options{TLS: tlsCfg, TLSRequired: f.tlsRequired, MaxClients: f.maxClients}
	if f.verbose {
		var mu sync.Mutex
		opts.Logf = func(format string, args ...any) {
			mu.Lock()
			defer mu.Unlock()
			fmt.Fprintf(stderr, "imgloop serve: "+format+"\n", args...)
		}
	}
	if f.oneshot {
		opts.OnConnClose = stop
	}
	srv, err := nbd.NewServer(exports, opts)
	if err != nil {
		return err
	}
	ls, err := f.listen()
	if err != nil {
		return err
	}
	defer func() {
		for _, l := range ls {
			if l.unixPath != "" {
				os.Remove(l.unixPath)
			}
		}
	}()
	if f.pidfile != "" {
		if err := os.WriteFile(f.pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			for _, l := range ls {
				l.Close()
			}
			return fmt.Errorf("--pidfile: %w", err)
		}
		defer os.Remove(f.pidfile)
	}
	serveErr := make(chan error, len(ls))
	for _, l := range ls {
		go func() { serveErr <- srv.Serve(l) }()
	}
	var uris strings.Builder
	for _, e := range exports {
		for _, l := range ls {
			fmt.Fprintln(&uris, l.uri(e.Name, tlsCfg != nil))
		}
	}
	io.WriteString(stdout, uris.String())
	if ready != nil {
		fmt.Fprintf(ready, "%sok\n", uris.String())
		ready.Close()
	}

	var failure error
	select {
	case <-ctx.Done():
	case failure = <-serveErr:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && failure == nil {
		failure = fmt.Errorf("shutting down: %w", err)
	}
	for i, img := range imgs {
		if err := img.Flush(); err != nil && failure == nil {
			failure = fmt.Errorf("%s: %w", images[i], err)
		}
	}
	if failure != nil && !errors.Is(failure, nbd.ErrServerClosed) {
		return failure
	}
	return nil
}

// forkServe runs serve again as a background process in a new session
// and returns once it accepts connections, printing its URIs, or with
// its error.
func forkServe(stdout io.Writer) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		w.Close()
		return err
	}
	defer devnull.Close()
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	sc := bufio.NewScanner(r)
	var uris []string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "ok":
			for _, u := range uris {
				fmt.Fprintln(stdout, u)
			}
			cmd.Process.Release()
			return nil
		case strings.HasPrefix(line, "error "):
			<-done
			return errors.New(strings.TrimPrefix(line, "error "))
		default:
			uris = append(uris, line)
		}
	}
	if err := <-done; err != nil {
		return fmt.Errorf("background server: %w", err)
	}
	return errors.New("background server exited before accepting connections")
}
