//! Counters, latency histograms and tallies that the connection tasks
//! update, and their serializable snapshots that worker processes send to
//! the parent for merging.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters of one worker, updated by its connection tasks.
        #[derive(Default, Debug)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A copy of [`Counters`] at one moment; snapshots of several
        /// workers add up.
        #[derive(Default, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct CounterSnapshot {
            $($(#[$doc])* #[serde(default)] pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl CounterSnapshot {
            pub fn add(&mut self, other: &CounterSnapshot) {
                $(self.$name += other.$name;)*
            }
        }
    };
}

counters! {
    /// Connection attempts started.
    connect_attempts,
    /// Connections that reached CONNECTION_SUCCESS.
    connected,
    /// Connection attempts that failed or timed out.
    connect_failed,
    /// Connection attempts skipped because the setup or storm time ran out.
    not_attempted,
    /// Connections open now (a gauge).
    open,
    /// Connections that the server closed, or that failed, before the end.
    dropped,
    /// NEW_MESSAGE events sent.
    sent,
    /// Messages whose frame could not be written.
    send_failed,
    /// MESSAGE_SENT acknowledgements received.
    acked,
    /// NEW_MESSAGE events received that nexus-load sent.
    delivered,
    /// NEW_MESSAGE events received whose content nexus-load did not write.
    foreign_messages,
    /// ERROR events received.
    errors,
    /// RATE_LIMIT_EXCEEDED events received.
    rate_limited,
    /// USER_PRESENCE_UPDATE events received.
    presence_updates,
    /// Other events received.
    other_events,
    /// Frames that did not parse.
    malformed_frames,
    /// Messages sent but neither acknowledged nor rejected (a gauge).
    in_flight,
    /// Storm connection attempts started (presence scenario).
    storm_attempts,
    /// Storm connections that reached CONNECTION_SUCCESS.
    storm_connected,
    /// Storm connection attempts that failed or timed out.
    storm_failed,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Subtracts one from a gauge.
pub fn drop_one(counter: &AtomicU64) {
    counter.fetch_sub(1, Ordering::Relaxed);
}

/// Maximum latency a histogram records (one hour); longer values are
/// recorded as one hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds, shared by many tasks.
pub struct LatencyRecorder {
    histogram: Mutex<Histogram<u64>>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self {
            histogram: Mutex::new(new_histogram()),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // Three significant digits over 1 us to 1 h: about 0.1 % error.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

impl LatencyRecorder {
    pub fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US);
        self.record_us(micros);
    }

    pub fn record_us(&self, micros: u64) {
        let mut histogram = self
            .histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        histogram.saturating_record(micros.clamp(1, MAX_LATENCY_US));
    }

    /// Returns the recorded values as `[value_us, count]` pairs.
    pub fn export(&self) -> Vec<[u64; 2]> {
        let histogram = self
            .histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        histogram
            .iter_recorded()
            .map(|bucket| [bucket.value_iterated_to(), bucket.count_at_value()])
            .collect()
    }
}

/// Counts of labelled outcomes (close reasons, error kinds), with at most
/// [`MAX_TALLY_KEYS`] distinct labels so that a flood of distinct messages
/// cannot grow it without bound.
#[derive(Default)]
pub struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
}

pub const MAX_TALLY_KEYS: usize = 32;
const OTHER_KEY: &str = "(other)";

impl Tally {
    pub fn add(&self, label: impl Into<String>) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        add_label(&mut counts, label.into(), 1);
    }

    pub fn export(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn add_label(counts: &mut BTreeMap<String, u64>, label: String, count: u64) {
    if counts.len() >= MAX_TALLY_KEYS && !counts.contains_key(&label) {
        *counts.entry(OTHER_KEY.to_string()).or_default() += count;
    } else {
        *counts.entry(label).or_default() += count;
    }
}

/// Merges `other` into `into`, keeping the label bound.
pub fn merge_tally(into: &mut BTreeMap<String, u64>, other: &BTreeMap<String, u64>) {
    for (label, count) in other {
        add_label(into, label.clone(), *count);
    }
}

/// Rebuilds a histogram from exported `[value_us, count]` pairs.
pub fn histogram_from(pairs: &[[u64; 2]]) -> Histogram<u64> {
    let mut histogram = new_histogram();
    for [value, count] in pairs {
        // Values came from a histogram with the same bounds, so they fit.
        let _ = histogram.record_n(*value, *count);
    }
    histogram
}

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Self {
            count: histogram.len(),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p95_ms: ms(histogram.value_at_quantile(0.95)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_add_up() {
        let counters = Counters::default();
        bump(&counters.sent);
        bump(&counters.sent);
        bump(&counters.open);
        drop_one(&counters.open);
        let mut total = counters.snapshot();
        total.add(&counters.snapshot());
        assert_eq!(total.sent, 4);
        assert_eq!(total.open, 0);
    }

    #[test]
    fn histogram_survives_export() {
        let recorder = LatencyRecorder::default();
        for micros in 1..=1000 {
            recorder.record_us(micros * 1000);
        }
        let merged = histogram_from(&recorder.export());
        let summary = LatencySummary::of(&merged).expect("non-empty");
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 500.0).abs() < 1.0, "{summary:?}");
        assert!((summary.max_ms - 1000.0).abs() < 1.0, "{summary:?}");
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert_eq!(LatencySummary::of(&histogram_from(&[])), None);
    }

    #[test]
    fn tally_is_bounded() {
        let tally = Tally::default();
        for i in 0..100 {
            tally.add(format!("error {i}"));
        }
        let counts = tally.export();
        assert_eq!(counts.len(), MAX_TALLY_KEYS + 1);
        assert_eq!(counts.get(OTHER_KEY), Some(&(100 - MAX_TALLY_KEYS as u64)));
    }
}
