//! Small runs of every scenario against real `nexus-host` processes with a
//! private Redis and a fresh Postgres database.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{run_load, serial, words, Stack, RELAXED_LIMITS};

const LIMIT: Duration = Duration::from_secs(90);

fn latency<'a>(result: &'a Value, name: &str) -> &'a Value {
    &result["latency_ms"][name]
}

#[test]
fn idle_holds_every_connection() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();
    let pid = stack.hosts[0].pid().to_string();

    let run = run_load(
        stack.dir.path(),
        &words(&format!(
            "--url {url} --server-pid {pid} idle --connections 30 --duration 2"
        )),
        LIMIT,
    );
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    assert_eq!(run.counter("connected"), 30, "{result}");
    assert_eq!(run.counter("connect_failed"), 0, "{result}");
    assert_eq!(result["open_at_stop"], 30, "{result}");
    assert_eq!(run.counter("dropped"), 0, "{result}");
    assert_eq!(
        result["servers"].as_array().map(Vec::len),
        Some(1),
        "{result}"
    );
    assert!(
        result["servers"][0]["rss_kib_after"].as_u64() > Some(0),
        "{result}"
    );
    assert!(
        result["memory_per_connection_bytes"].is_number(),
        "{result}"
    );
    assert_eq!(latency(result, "handshake")["count"], 30, "{result}");
    assert!(
        run.stdout.contains("server memory per connection"),
        "{}",
        run.stdout
    );
}

#[test]
fn chat_delivers_every_message() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();

    let run = run_load(
        stack.dir.path(),
        &words(&format!(
            "--url {url} chat --pairs 5 --rate 50 --duration 2 --payload-bytes 200"
        )),
        LIMIT,
    );
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    let sent = run.counter("sent");
    // 50 messages/s for 2 s; timer skew may lose a few.
    assert!((80..=101).contains(&sent), "sent {sent}: {result}");
    assert_eq!(run.counter("acked"), sent, "{result}");
    assert_eq!(run.counter("delivered"), sent, "{result}");
    assert_eq!(run.counter("errors"), 0, "{result}");
    assert_eq!(run.counter("rate_limited"), 0, "{result}");
    assert_eq!(run.counter("in_flight"), 0, "{result}");
    assert_eq!(latency(result, "delivery")["count"], sent, "{result}");
    assert_eq!(latency(result, "ack")["count"], sent, "{result}");
    assert!(
        latency(result, "delivery")["p99_ms"].as_f64() > Some(0.0),
        "{result}"
    );
    assert!(
        result["throughput"]["delivered_per_s"].as_f64() > Some(30.0),
        "{result}"
    );
}

#[test]
fn chat_flood_keeps_in_flight_bounded() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();

    let run = run_load(
        stack.dir.path(),
        &words(&format!(
            "--url {url} chat --pairs 3 --rate 0 --in-flight 2 --duration 2"
        )),
        LIMIT,
    );
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    let sent = run.counter("sent");
    assert!(sent > 50, "sent {sent}: {result}");
    assert_eq!(run.counter("acked"), sent, "{result}");
    assert_eq!(run.counter("delivered"), sent, "{result}");
    assert_eq!(run.counter("in_flight"), 0, "{result}");
    assert!(
        run.stderr.contains("--rate 0 sends as fast"),
        "{}",
        run.stderr
    );
}

#[test]
fn chat_across_instances_in_two_processes() {
    let _serial = serial();
    let stack = Stack::start(2, RELAXED_LIMITS);
    let urls = stack.urls();
    let (url_a, url_b) = (&urls[0], &urls[1]);
    let first = stack.hosts[0].pid().to_string();
    let second = stack.hosts[1].pid().to_string();

    let line = format!(
        "--url {url_a} --url {url_b} --processes 2 --server-pid {first} --server-pid {second} \
         chat --pairs 6 --rate 60 --duration 2 --cross-instance"
    );
    let run = run_load(stack.dir.path(), &words(&line), LIMIT);
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    assert_eq!(result["processes"], 2, "{result}");
    assert_eq!(run.counter("connected"), 12, "{result}");
    let sent = run.counter("sent");
    assert!(sent >= 90, "sent {sent}: {result}");
    assert_eq!(run.counter("acked"), sent, "{result}");
    assert_eq!(run.counter("delivered"), sent, "{result}");
    assert_eq!(
        result["servers"].as_array().map(Vec::len),
        Some(2),
        "{result}"
    );
    assert_eq!(result["worker_failures"], Value::Array(vec![]), "{result}");
}

#[test]
fn chat_counts_rate_limit_apart_from_errors() {
    let _serial = serial();
    let limits = [
        ("SPIN_VARIABLE_MESSAGE_RATE_LIMIT", "5"),
        ("MAX_EVENTS_PER_SECOND", "1000"),
    ];
    let stack = Stack::start(1, &limits);
    let url = stack.hosts[0].url();

    let run = run_load(
        stack.dir.path(),
        &words(&format!(
            "--url {url} chat --pairs 1 --rate 20 --duration 2"
        )),
        LIMIT,
    );
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    let sent = run.counter("sent");
    let acked = run.counter("acked");
    let limited = run.counter("rate_limited");
    // Two users, five messages each in the window; the rest are rejected.
    assert_eq!(acked, 10, "{result}");
    assert_eq!(limited, sent - acked, "{result}");
    assert_eq!(run.counter("errors"), 0, "{result}");
    assert_eq!(run.counter("in_flight"), 0, "{result}");
    assert!(
        run.stderr.contains("more than the servers' default limit"),
        "{}",
        run.stderr
    );
}

#[test]
fn chat_rotation_spreads_users() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();

    let run = run_load(
        stack.dir.path(),
        &words(&format!(
            "--url {url} chat --pairs 2 --rotate 3 --rate 30 --duration 2"
        )),
        LIMIT,
    );
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    assert_eq!(run.counter("connected"), 12, "{result}");
    let sent = run.counter("sent");
    assert!((45..=61).contains(&sent), "sent {sent}: {result}");
    assert_eq!(run.counter("delivered"), sent, "{result}");
}

#[test]
fn connect_storm_counts_handshakes() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();

    let run = run_load(
        stack.dir.path(),
        &words(&format!(
            "--url {url} --source-addresses 4 connect --connections 60 --concurrency 10"
        )),
        LIMIT,
    );
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    assert_eq!(run.counter("connected"), 60, "{result}");
    assert_eq!(run.counter("connect_failed"), 0, "{result}");
    assert_eq!(result["open_at_stop"], 60, "{result}");
    assert!(
        result["connects"]["connects_per_s"].as_f64() > Some(0.0),
        "{result}"
    );
    assert!(
        result["connects"]["elapsed_s"].as_f64() < Some(30.0),
        "{result}"
    );
    assert_eq!(latency(result, "handshake")["count"], 60, "{result}");
    assert_eq!(latency(result, "tcp")["count"], 60, "{result}");
}

#[test]
fn connect_with_authenticate_event() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();

    let run = run_load(
        stack.dir.path(),
        &words(&format!(
            "--url {url} --auth event connect --connections 20 --concurrency 5"
        )),
        LIMIT,
    );
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    assert_eq!(run.counter("connected"), 20, "{result}");
}

#[test]
fn connect_with_wrong_secret_fails_authentication() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();

    let line = format!(
        "--url {url} --jwt-secret a-different-secret-that-the-server-does-not-use \
         connect --connections 5 --concurrency 5"
    );
    let run = run_load(stack.dir.path(), &words(&line), LIMIT);
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    assert_eq!(run.counter("connected"), 0, "{result}");
    assert_eq!(run.counter("connect_failed"), 5, "{result}");
    let errors = result["connect_errors"]
        .as_object()
        .expect("connect_errors object");
    assert!(
        errors
            .keys()
            .all(|label| label.starts_with("authentication")),
        "{result}"
    );
}

#[test]
fn presence_storm_during_chat() {
    let _serial = serial();
    let stack = Stack::start(1, RELAXED_LIMITS);
    let url = stack.hosts[0].url();

    let line = format!(
        "--url {url} presence --pairs 4 --rate 40 --duration 4 \
         --storm-connections 40 --storm-after 1 --storm-window 1"
    );
    let run = run_load(stack.dir.path(), &words(&line), LIMIT);
    let result = run.json();

    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, stack.logs());
    assert_eq!(run.counter("storm_connected"), 40, "{result}");
    assert_eq!(run.counter("storm_failed"), 0, "{result}");
    assert_eq!(result["open_at_stop"], 48, "{result}");
    let sent = run.counter("sent");
    assert_eq!(run.counter("delivered"), sent, "{result}");
    for phase in [
        "delivery_before_storm",
        "delivery_during_storm",
        "delivery_after_storm",
    ] {
        assert!(
            latency(result, phase)["count"].as_u64() > Some(0),
            "{phase}: {result}"
        );
    }
    assert_eq!(latency(result, "storm_handshake")["count"], 40, "{result}");
    let start = result["storm"]["start_s"].as_f64().expect("storm start");
    assert!((0.9..2.0).contains(&start), "{result}");
}

#[test]
fn rejects_targets_off_loopback() {
    // Both addresses reach this machine, so a failed check still sends
    // nothing elsewhere; nexus-load accepts only 127.0.0.0/8, ::1 and
    // localhost literally.
    let dir = tempfile::tempdir().expect("temporary folder");
    for url in ["ws://0.0.0.0:9", "ws://[::ffff:127.0.0.1]:9"] {
        let run = run_load(
            dir.path(),
            &words(&format!("--url {url} idle --connections 1")),
            LIMIT,
        );
        assert_eq!(run.code, Some(2), "{url}: {}", run.stderr);
        assert!(
            run.stderr.contains("is not a loopback address"),
            "{url}: {}",
            run.stderr
        );
        assert!(run.result.is_none(), "{url}: wrote a result");
    }
}

#[test]
fn rejects_too_many_connections_for_one_process() {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("reading /proc/self/limits");
    let soft_limit = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|value| value.parse::<u64>().ok());
    let Some(soft_limit) = soft_limit.filter(|limit| *limit < 200_000) else {
        eprintln!("open-file limit is 200000 or more; nothing to reject here");
        return;
    };
    eprintln!("open-file limit {soft_limit}");
    let dir = tempfile::tempdir().expect("temporary folder");

    let run = run_load(
        dir.path(),
        &words("--processes 1 idle --connections 200000"),
        LIMIT,
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("open-file limit"), "{}", run.stderr);
}
