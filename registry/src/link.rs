//! What a registry link costs, measured from a client's own requests: a request's own time (the
//! registry's work and the round trip) and the bytes per second the link carries. Their product
//! is the gap a batch of range reads should bridge: fetching the bytes between two wanted chunks
//! costs less than a request of its own when they take less time to arrive than a request costs.
//! On loopback that is hundreds of KiB to a MiB (requests cost milliseconds of the registry's
//! work, bytes almost nothing); over a 100 Mbit/s link tens of KiB (every KiB bridged delays the
//! chunks behind it), though small requests queue there behind the link's bulk, which keeps the
//! measured cost of a request high.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// The gap bridged before anything is measured.
pub const DEFAULT_GAP: u64 = 256 << 10;
/// The most ever bridged: wider gaps fetch more bytes than the requests they save cost, even on
/// loopback. Measured there (cold `hb run`s of build-step after `hb optimize`, six rounds each,
/// every batch bridging one fixed gap, set by a temporary build not kept in the tree): 256 KiB 470-496 ms to first output, 512 KiB 464 ms,
/// 1 MiB 435-455 ms, 2 MiB 501 ms, 4 MiB 484 ms. A docker-registry spends milliseconds of CPU on
/// each request, and on a small machine that CPU is the container's.
pub const MAX_GAP: u64 = 1 << 20;
/// The least bridged once measured: below this, requests cost more than their bytes on any link.
pub const MIN_GAP: u64 = 16 << 10;
/// Requests up to this size measure a request's own time (their bytes take little of it).
const SMALL: u64 = 64 << 10;
/// Transfers from this size on measure the throughput (a request's own time is little of theirs).
const LARGE: u64 = 512 << 10;
/// Small requests remembered; their fastest is a request's own time (the others waited for the
/// link or a busy registry, which is not the cost of one more request).
const SAMPLES: usize = 64;

/// A client's measurements; shared by every request through it.
#[derive(Debug, Default)]
pub struct LinkCost {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    small: VecDeque<Duration>,
    /// Bytes per second, a moving average of large transfers.
    throughput: Option<f64>,
}

impl LinkCost {
    /// One request of `bytes` that took `took` from sending it to its last byte. Only small ones
    /// count (a request's own time); a large one, made beside others, saw part of the link only.
    pub fn request(&self, bytes: u64, took: Duration) {
        if bytes > SMALL {
            return;
        }
        let mut i = self.inner.lock().expect("link lock");
        if i.small.len() == SAMPLES {
            i.small.pop_front();
        }
        i.small.push_back(took);
    }

    /// Requests made side by side, all that was in flight: `bytes` in all arrived in `took` (the
    /// link's throughput).
    pub fn transfer(&self, bytes: u64, took: Duration) {
        if bytes >= LARGE {
            self.inner.lock().expect("link lock").throughput_sample(bytes, took);
        }
    }

    /// The gap a batch bridges: a request's own time times the throughput, within
    /// [`MIN_GAP`]..=[`MAX_GAP`]; [`DEFAULT_GAP`] until both are measured.
    pub fn gap(&self) -> u64 {
        let i = self.inner.lock().expect("link lock");
        let (Some(own), Some(rate)) = (i.small.iter().min(), i.throughput) else { return DEFAULT_GAP };
        ((own.as_secs_f64() * rate) as u64).clamp(MIN_GAP, MAX_GAP)
    }
}

impl Inner {
    fn throughput_sample(&mut self, bytes: u64, took: Duration) {
        let rate = bytes as f64 / took.as_secs_f64().max(1e-6);
        // The larger of the average and the sample moves it at once: requests that shared the
        // link each saw part of it, and an average of those parts would stay low.
        self.throughput = Some(match self.throughput {
            None => rate,
            Some(t) if rate > t => rate,
            Some(t) => 0.75 * t + 0.25 * rate,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_measured_bridges_the_default_gap() {
        let l = LinkCost::default();
        assert_eq!(l.gap(), DEFAULT_GAP);
        l.request(4 << 10, ms(3));
        assert_eq!(l.gap(), DEFAULT_GAP, "a request's cost alone says nothing of the bytes");
        l.request(4 << 20, ms(30));
        assert_eq!(l.gap(), DEFAULT_GAP, "nor does one large request among others");
    }

    #[test]
    fn a_slow_link_bridges_little_and_loopback_the_most() {
        // 100 Mbit/s: 12.5 MB/s, requests of 3 ms: ~37 KB.
        let slow = LinkCost::default();
        slow.request(8 << 10, ms(3));
        slow.transfer(2 << 20, Duration::from_secs_f64((2 << 20) as f64 / 12.5e6));
        let g = slow.gap();
        assert!((30_000..45_000).contains(&g), "{g}");
        // Loopback: 1 GB/s, requests of 2 ms: 2 MB, bounded.
        let fast = LinkCost::default();
        fast.request(8 << 10, ms(2));
        fast.transfer(8 << 20, ms(8));
        assert_eq!(fast.gap(), MAX_GAP);
        // Half a millisecond a request at 1 GB/s: ~500 KiB, wider than before anything was measured.
        let quick = LinkCost::default();
        quick.request(8 << 10, Duration::from_micros(500));
        quick.transfer(8 << 20, ms(8));
        assert!((DEFAULT_GAP + 1..MAX_GAP).contains(&quick.gap()), "{}", quick.gap());
        // A link that makes any bridging too dear still bridges the least.
        let dear = LinkCost::default();
        dear.request(1 << 10, Duration::from_micros(200));
        dear.transfer(1 << 20, Duration::from_secs(1));
        assert_eq!(dear.gap(), MIN_GAP);
    }

    #[test]
    fn the_fastest_small_request_is_the_cost_of_one_more() {
        let l = LinkCost::default();
        l.transfer(10 << 20, Duration::from_secs(1));
        for took in [40, 25, 4, 30] {
            l.request(16 << 10, ms(took));
        }
        // 4 ms x ~10.5 MB/s, not the requests that waited behind others.
        let g = l.gap();
        assert!((40_000..45_000).contains(&g), "{g}");
        // Old samples leave: a window of slower ones later, the 4 ms one is gone.
        for _ in 0..SAMPLES {
            l.request(16 << 10, ms(20));
        }
        assert_eq!(l.gap(), MAX_GAP.min((0.020 * (10 << 20) as f64) as u64));
    }

    #[test]
    fn throughput_follows_the_best_transfers_and_decays_slowly() {
        let l = LinkCost::default();
        l.request(1 << 10, ms(4));
        l.transfer(1 << 20, ms(100)); // 10.5 MB/s
        l.transfer(1 << 20, ms(400)); // a slow batch: the average moves a quarter of the way
        let expect = 0.004 * (0.75 * 10_485_760.0 + 0.25 * 2_621_440.0);
        assert!((l.gap() as f64 - expect).abs() < 1.0, "{} vs {expect}", l.gap());
        l.transfer(4 << 20, ms(100)); // 42 MB/s: taken at once
        assert_eq!(l.gap(), (0.004 * 41_943_040.0) as u64);
        // Small transfers say nothing of the throughput.
        l.transfer(100 << 10, ms(1000));
        assert_eq!(l.gap(), (0.004 * 41_943_040.0) as u64);
    }
}
