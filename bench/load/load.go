// Package load drives traffic for the data-plane benchmarks: fixed-rate
// request/response over persistent connections, and bulk throughput to a
// sink, through any dialer (plain TCP, TLS).
package load

import (
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Dial opens one connection to what is measured.
type Dial func() (net.Conn, error)

// Latency sends size-byte requests to an echo server at rate per second,
// spread over conns persistent connections, for d, and returns every round
// trip, sorted. Each connection first makes one exchange that is not
// counted, and the timed ones start once every connection has made it: a
// connection's first exchange pays for setting it up (a proxy's upstream
// connection and mTLS handshake), which ConnectEach measures; this
// measures requests on connections already open.
func Latency(dial Dial, rate, conns, size int, d time.Duration) ([]time.Duration, error) {
	out, err := LatencyTogether([]Dial{dial}, rate, conns, size, d)
	if err != nil {
		return nil, err
	}
	return out[0], nil
}

// LatencyTogether runs Latency against every dialer at the same time, each
// at rate per second, their requests taking turns: one request every
// 1/(rate*len(dials)) seconds, to each dialer in turn. A slow spell of the
// machine then falls on every dialer's requests alike. It returns each
// dialer's round trips, sorted.
func LatencyTogether(dials []Dial, rate, conns, size int, d time.Duration) ([][]time.Duration, error) {
	n := len(dials)
	var mu sync.Mutex
	out := make([][]time.Duration, n)
	errs := make(chan error, n*conns)
	var opened, wg sync.WaitGroup
	start := make(chan time.Time)
	interval := time.Second * time.Duration(conns) / time.Duration(rate)
	exchange := func(c net.Conn, req, resp []byte) error {
		if _, err := c.Write(req); err != nil {
			return err
		}
		_, err := io.ReadFull(c, resp)
		return err
	}
	opened.Add(n * conns)
	for i := range n * conns {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			target := i % n
			req, resp := make([]byte, size), make([]byte, size)
			c, err := dials[target]()
			if err == nil {
				defer c.Close()
				err = exchange(c, req, resp)
			}
			opened.Done()
			t0 := <-start
			if err != nil {
				errs <- err
				return
			}
			// Connections start spread over one interval, the
			// dialers' taking turns.
			next := t0.Add(interval * time.Duration(i) / time.Duration(n*conns))
			end := t0.Add(d)
			var mine []time.Duration
			for next.Before(end) {
				time.Sleep(time.Until(next))
				sent := time.Now()
				if err := exchange(c, req, resp); err != nil {
					errs <- err
					return
				}
				mine = append(mine, time.Since(sent))
				next = next.Add(interval)
			}
			mu.Lock()
			out[target] = append(out[target], mine...)
			mu.Unlock()
		}(i)
	}
	opened.Wait()
	t0 := time.Now()
	for range n * conns {
		start <- t0
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	for _, l := range out {
		slices.Sort(l)
	}
	return out, nil
}

// LatencyRounds runs Latency against every dialer for each in turn,
// rounds times, the order rotating each round, so a slow spell of the
// machine (CPU steal on a shared host) falls on all of them alike; it
// returns each dialer's round trips, sorted.
func LatencyRounds(dials []Dial, rate, conns, size int, each time.Duration, rounds int) ([][]time.Duration, error) {
	out := make([][]time.Duration, len(dials))
	err := rotating(len(dials), rounds, func(i int) error {
		l, err := Latency(dials[i], rate, conns, size, each)
		out[i] = append(out[i], l...)
		return err
	})
	for _, l := range out {
		slices.Sort(l)
	}
	return out, err
}

// rotating calls measure with each of n targets in turn, rounds times, the
// order rotating each round, until one fails.
func rotating(n, rounds int, measure func(i int) error) error {
	for r := 0; r < rounds; r++ {
		for k := 0; k < n; k++ {
			if err := measure((r + k) % n); err != nil {
				return err
			}
		}
	}
	return nil
}

// Steal starts measuring the CPU time the hypervisor gave to others
// (/proc/stat's steal) and returns a func that reports it since then, as a
// share of all CPU time; -1 where /proc/stat cannot be read.
func Steal() func() float64 {
	t0, err0 := cpuStat()
	return func() float64 {
		t1, err1 := cpuStat()
		if err0 != nil || err1 != nil || t1.total <= t0.total {
			return -1
		}
		return float64(t1.steal-t0.steal) / float64(t1.total-t0.total)
	}
}

// HostBusy is the CPU time all of the host's CPUs have spent on anything
// but idling (or waiting for the hypervisor) so far.
func HostBusy() (time.Duration, error) {
	t, err := cpuStat()
	return time.Duration(t.busy) * 10 * time.Millisecond, err
}

// ticks are /proc/stat's counts for all CPUs together, in 10 ms ticks.
type ticks struct{ steal, busy, total int64 }

func cpuStat() (ticks, error) {
	var t ticks
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return t, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return t, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	// user nice system idle iowait irq softirq steal; guest and
	// guest_nice, after them, are counted in user already.
	for i, v := range f[1:9] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return t, fmt.Errorf("/proc/stat: %w", err)
		}
		t.total += n
		switch i {
		case 3, 4: // idle, iowait
		case 7:
			t.steal = n
		default:
			t.busy += n
		}
	}
	return t, nil
}

// ConnectEach makes rounds rounds of request/response exchanges, each on a
// new connection, one to every dialer in turn (the order rotating), so
// every target is measured under the same conditions; it returns each
// dialer's durations, sorted.
func ConnectEach(dials []Dial, rounds, size int) ([][]time.Duration, error) {
	out := make([][]time.Duration, len(dials))
	buf := make([]byte, size)
	err := rotating(len(dials), rounds, func(i int) error {
		start := time.Now()
		c, err := dials[i]()
		if err != nil {
			return err
		}
		_, err = c.Write(buf)
		if err == nil {
			_, err = io.ReadFull(c, buf)
		}
		c.Close()
		out[i] = append(out[i], time.Since(start))
		return err
	})
	for _, l := range out {
		slices.Sort(l)
	}
	return out, err
}

// Throughput sends total bytes over n connections to a sink (which answers
// with the count it got once the sender closes) and returns bytes per
// second.
func Throughput(dial Dial, total, n int) (float64, error) {
	buf := make([]byte, 64<<10)
	start := time.Now()
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			c, err := dial()
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for sent := 0; sent < total/n; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					errs <- err
					return
				}
			}
			if cw, ok := c.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			}
			var got int
			if _, err := fmt.Fscan(c, &got); err != nil || got < total/n {
				errs <- fmt.Errorf("the sink got %d bytes: %v", got, err)
				return
			}
			errs <- nil
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			return 0, err
		}
	}
	return float64(total) / time.Since(start).Seconds(), nil
}

// ThroughputRounds measures every dialer's throughput rounds times, the
// order rotating each round (as ConnectEach does), so drift in the
// machine's speed falls on all of them alike; it returns each dialer's
// measurements in round order.
func ThroughputRounds(dials []Dial, total, n, rounds int) ([][]float64, error) {
	out := make([][]float64, len(dials))
	err := rotating(len(dials), rounds, func(i int) error {
		v, err := Throughput(dials[i], total, n)
		out[i] = append(out[i], v)
		return err
	})
	return out, err
}

// Median returns the median of v (the mean of the middle two for an even
// count).
func Median(v []float64) float64 {
	s := slices.Sorted(slices.Values(v))
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

// Percentile returns the q-th percentile of sorted durations.
func Percentile(l []time.Duration, q float64) time.Duration {
	if len(l) == 0 {
		return 0
	}
	return l[min(len(l)-1, int(float64(len(l))*q/100))]
}

// Ms renders a duration in milliseconds.
func Ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Serve runs handle for every connection ln accepts until ln is closed.
func Serve(ln net.Listener, handle func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() { defer c.Close(); handle(c) }()
	}
}

// Echo echoes what it reads.
func Echo(c net.Conn) { _, _ = io.Copy(c, c) }

// Sink counts what it reads and answers with the count.
func Sink(c net.Conn) {
	n, _ := io.Copy(io.Discard, c)
	fmt.Fprintf(c, "%d\n", n)
}

// Verdict renders whether a target was met.
func Verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}
