package bench

import (
	"fmt"
	"io"
	"time"

	"github.com/schollz/progressbar/v3"
)

// progress redraws a progress bar from a counter a few times a second, so
// the hot path only bumps atomics and never touches the bar's lock.
type progress struct {
	bar  *progressbar.ProgressBar
	w    io.Writer
	stop chan struct{}
	done chan struct{}
}

// startProgress draws a bar on w (nothing when w is nil) whose value and
// description suffix come from poll.
func startProgress(w io.Writer, desc string, total int64, poll func() (int64, string)) *progress {
	p := &progress{w: w, stop: make(chan struct{}), done: make(chan struct{})}
	if w == nil {
		close(p.done)
		return p
	}
	p.bar = progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionShowCount(),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionSetElapsedTime(true),
	)
	update := func() {
		n, extra := poll()
		p.bar.Describe(desc + extra)
		_ = p.bar.Set64(min(n, total))
	}
	go func() {
		defer close(p.done)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				update()
				_ = p.bar.Exit()
				fmt.Fprintln(w)
				return
			case <-t.C:
				update()
			}
		}
	}()
	return p
}

// finish draws the final state and ends the line.
func (p *progress) finish() {
	select {
	case <-p.done:
		return
	default:
	}
	close(p.stop)
	<-p.done
}
