//! Message-flow profiling: who sends what to whom, how big, how long it waits in a mailbox, how
//! long its handling takes, and what each forward batch served. Off unless a run asks for it
//! (`fedbpt run --trace FILE`); then every message carries a [`Stamp`] and its receiver reports
//! the handling. Writes a Chrome trace (Perfetto, chrome://tracing) and a per-flow CSV.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

/// Identity and send time of one message (id 0: profiling is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub id: u64,
    pub sent_us: u64,
}

/// What a message was.
#[derive(Debug, Clone)]
pub struct MessageInfo {
    pub sender: String,
    pub receiver: String,
    pub message: &'static str,
    pub round: Option<usize>,
    pub bytes: usize,
}

#[derive(Debug, Clone)]
struct MessageEvent {
    id: u64,
    info: MessageInfo,
    sent_us: u64,
    start_us: u64,
    end_us: u64,
}

#[derive(Debug, Clone)]
struct ForwardEvent {
    worker: String,
    start_us: u64,
    end_us: u64,
    examples: usize,
    tokens: usize,
    candidates: usize,
    served: String,
}

#[derive(Debug, Clone)]
struct PhaseEvent {
    actor: String,
    phase: &'static str,
    start_us: u64,
    end_us: u64,
}

/// Collects events of one run.
pub struct Profiler {
    origin: Instant,
    /// `origin` on the wall clock (microseconds since the Unix epoch): stamps that cross to
    /// another process travel in it, and traces of several processes merge on it.
    origin_unix_us: u64,
    next_id: AtomicU64,
    messages: Mutex<Vec<MessageEvent>>,
    forwards: Mutex<Vec<ForwardEvent>>,
    phases: Mutex<Vec<PhaseEvent>>,
}

static ACTIVE: RwLock<Option<Arc<Profiler>>> = RwLock::new(None);

fn active() -> Option<Arc<Profiler>> {
    ACTIVE.read().ok().and_then(|g| g.clone())
}

/// The actor kind of a name (`site-3#1` -> `client`).
pub fn kind(name: &str) -> &'static str {
    if name.starts_with("site-") {
        "client"
    } else if name.starts_with("forward-worker") {
        "forward-worker"
    } else {
        match name {
            "server" => "server",
            "evaluator" => "evaluator",
            "data-loader" => "data-loader",
            "client-supervisor" => "supervisor",
            _ => "main",
        }
    }
}

impl Profiler {
    /// Starts profiling this process's runtime; returns the collector.
    pub fn start() -> Arc<Profiler> {
        let p = Arc::new(Profiler {
            origin: Instant::now(),
            origin_unix_us: unix_us(),
            next_id: AtomicU64::new(1),
            messages: Mutex::new(Vec::new()),
            forwards: Mutex::new(Vec::new()),
            phases: Mutex::new(Vec::new()),
        });
        if let Ok(mut g) = ACTIVE.write() {
            *g = Some(p.clone());
        }
        p
    }

    /// Stops collecting (events recorded so far stay).
    pub fn stop() {
        if let Ok(mut g) = ACTIVE.write() {
            *g = None;
        }
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A stamp as it leaves this process: its send time on the wall clock (none when profiling is
/// off here).
pub fn to_wall_clock(stamp: Stamp) -> Stamp {
    match active().filter(|_| stamp.id != 0) {
        Some(p) => Stamp { id: stamp.id, sent_us: p.origin_unix_us + stamp.sent_us },
        None => Stamp::default(),
    }
}

/// A stamp from another process, on this process's profiler clock (none when profiling is off
/// here).
pub fn from_wall_clock(stamp: Stamp) -> Stamp {
    match active().filter(|_| stamp.id != 0) {
        Some(p) => Stamp { id: stamp.id, sent_us: stamp.sent_us.saturating_sub(p.origin_unix_us) },
        None => Stamp::default(),
    }
}

/// A stamp for a message about to be sent.
pub fn stamp() -> Stamp {
    match active() {
        Some(p) => Stamp { id: p.next_id.fetch_add(1, Ordering::Relaxed), sent_us: p.now_us() },
        None => Stamp::default(),
    }
}

/// The handling of one message, reported by its receiver when the guard drops.
pub struct Handling {
    profiler: Option<Arc<Profiler>>,
    stamp: Stamp,
    info: Option<MessageInfo>,
    start_us: u64,
}

/// Call at the start of a handler; the returned guard records the span when dropped.
pub fn handling(stamp: Stamp, info: impl FnOnce() -> MessageInfo) -> Handling {
    match active().filter(|_| stamp.id != 0) {
        Some(p) => {
            let start_us = p.now_us();
            Handling { profiler: Some(p), stamp, info: Some(info()), start_us }
        }
        None => Handling { profiler: None, stamp, info: None, start_us: 0 },
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        if let (Some(p), Some(info)) = (self.profiler.take(), self.info.take()) {
            let ev = MessageEvent {
                id: self.stamp.id,
                info,
                sent_us: self.stamp.sent_us,
                start_us: self.start_us,
                end_us: p.now_us(),
            };
            if let Ok(mut m) = p.messages.lock() {
                m.push(ev);
            }
        }
    }
}

/// A message whose receipt is its whole handling (an RPC reply gathered by the caller).
pub fn received(stamp: Stamp, info: MessageInfo) {
    drop(handling(stamp, || info));
}

/// One forward batch on a worker.
pub fn forward(
    worker: &str,
    start: Instant,
    examples: usize,
    tokens: usize,
    candidates: usize,
    served: &str,
) {
    if let Some(p) = active() {
        let end_us = p.now_us();
        let dur = start.elapsed().as_micros() as u64;
        let ev = ForwardEvent {
            worker: worker.to_string(),
            start_us: end_us.saturating_sub(dur),
            end_us,
            examples,
            tokens,
            candidates,
            served: served.to_string(),
        };
        if let Ok(mut f) = p.forwards.lock() {
            f.push(ev);
        }
    }
}

/// A stretch of compute outside the forwards (a client's CMA-ES step, the server's aggregation)
/// that began at `start` and ends now.
pub fn phase(actor: &str, phase: &'static str, start: Instant) {
    if let Some(p) = active() {
        let end_us = p.now_us();
        let dur = start.elapsed().as_micros() as u64;
        let ev = PhaseEvent {
            actor: actor.to_string(),
            phase,
            start_us: end_us.saturating_sub(dur),
            end_us,
        };
        if let Ok(mut v) = p.phases.lock() {
            v.push(ev);
        }
    }
}

/// One message's handling, for analysis (microseconds on the profiler's clock).
#[derive(Debug, Clone)]
pub struct MessageSpan {
    pub message: &'static str,
    pub receiver: String,
    pub sent_us: u64,
    pub start_us: u64,
    pub end_us: u64,
}

/// What a run recorded, for analysis (`fedbpt bench-scale`): message handlings, forward
/// batches and compute phases as `(start_us, end_us)`.
#[derive(Debug, Clone, Default)]
pub struct Spans {
    pub messages: Vec<MessageSpan>,
    pub forwards: Vec<(u64, u64)>,
    pub phases: Vec<(&'static str, u64, u64)>,
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Per (sender kind, receiver kind, message) statistics.
#[derive(Debug, Clone)]
pub struct FlowRow {
    pub sender: String,
    pub receiver: String,
    pub message: String,
    pub count: usize,
    pub bytes: usize,
    pub handle_us: [u64; 3],
    pub wait_us: [u64; 2],
}

impl Profiler {
    /// Everything recorded so far.
    pub fn spans(&self) -> Spans {
        let messages = self
            .messages
            .lock()
            .map(|m| {
                m.iter()
                    .map(|e| MessageSpan {
                        message: e.info.message,
                        receiver: e.info.receiver.clone(),
                        sent_us: e.sent_us,
                        start_us: e.start_us,
                        end_us: e.end_us,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let forwards = self
            .forwards
            .lock()
            .map(|f| f.iter().map(|e| (e.start_us, e.end_us)).collect())
            .unwrap_or_default();
        let phases = self
            .phases
            .lock()
            .map(|v| v.iter().map(|e| (e.phase, e.start_us, e.end_us)).collect())
            .unwrap_or_default();
        Spans { messages, forwards, phases }
    }

    /// The per-flow table (sorted by sender, receiver, message).
    pub fn flows(&self) -> Vec<FlowRow> {
        let msgs = self.messages.lock().map(|m| m.clone()).unwrap_or_default();
        let mut groups: BTreeMap<(String, String, String), Vec<&MessageEvent>> = BTreeMap::new();
        for m in &msgs {
            let key = (
                kind(&m.info.sender).to_string(),
                kind(&m.info.receiver).to_string(),
                m.info.message.to_string(),
            );
            groups.entry(key).or_default().push(m);
        }
        groups
            .into_iter()
            .map(|((sender, receiver, message), evs)| {
                let mut handle: Vec<u64> = evs.iter().map(|e| e.end_us - e.start_us).collect();
                let mut wait: Vec<u64> =
                    evs.iter().map(|e| e.start_us.saturating_sub(e.sent_us)).collect();
                handle.sort_unstable();
                wait.sort_unstable();
                FlowRow {
                    sender,
                    receiver,
                    message,
                    count: evs.len(),
                    bytes: evs.iter().map(|e| e.info.bytes).sum(),
                    handle_us: [
                        percentile(&handle, 0.5),
                        percentile(&handle, 0.95),
                        percentile(&handle, 0.99),
                    ],
                    wait_us: [percentile(&wait, 0.5), percentile(&wait, 0.99)],
                }
            })
            .collect()
    }

    /// `messages.csv`.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        let mut out = String::from(
            "sender,receiver,message,count,bytes,handle_p50_us,handle_p95_us,handle_p99_us,wait_p50_us,wait_p99_us\n",
        );
        for r in self.flows() {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{}",
                r.sender,
                r.receiver,
                r.message,
                r.count,
                r.bytes,
                r.handle_us[0],
                r.handle_us[1],
                r.handle_us[2],
                r.wait_us[0],
                r.wait_us[1]
            );
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<14} {:<14} {:<12} {:>7} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "sender",
            "receiver",
            "message",
            "count",
            "bytes",
            "hdl p50",
            "hdl p95",
            "hdl p99",
            "wait p50",
            "wait p99"
        );
        let ms = |us: u64| format!("{:.1}ms", us as f64 / 1000.0);
        for r in self.flows() {
            let _ = writeln!(
                s,
                "{:<14} {:<14} {:<12} {:>7} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10}",
                r.sender,
                r.receiver,
                r.message,
                r.count,
                r.bytes,
                ms(r.handle_us[0]),
                ms(r.handle_us[1]),
                ms(r.handle_us[2]),
                ms(r.wait_us[0]),
                ms(r.wait_us[1])
            );
        }
        s
    }

    /// The Chrome trace: one track per actor for handling, one per actor for mailbox waits,
    /// flow arrows from each send to its handling, and forward batches on the workers' tracks.
    pub fn write_chrome_trace(&self, path: &Path, run_span_us: (u64, u64)) -> Result<()> {
        let msgs = self.messages.lock().map(|m| m.clone()).unwrap_or_default();
        let fwds = self.forwards.lock().map(|f| f.clone()).unwrap_or_default();
        let phases = self.phases.lock().map(|v| v.clone()).unwrap_or_default();
        let mut tids: BTreeMap<String, u64> = BTreeMap::new();
        let tid = |name: &str, tids: &mut BTreeMap<String, u64>| {
            let n = tids.len() as u64 + 1;
            *tids.entry(name.to_string()).or_insert(n)
        };
        let mut events = Vec::new();
        let main = tid("main", &mut tids);
        events.push(json!({"name": "run", "cat": "run", "ph": "X", "pid": 1, "tid": main,
            "ts": run_span_us.0, "dur": run_span_us.1.saturating_sub(run_span_us.0)}));
        // Handling spans per actor, to anchor each arrow's tail in a span of its sender; a send
        // from outside any recorded span (actor start-up, the run itself) starts on `main`.
        let mut spans: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
        for m in &msgs {
            spans.entry(m.info.receiver.as_str()).or_default().push((m.start_us, m.end_us));
        }
        let covered = |who: &str, t: u64| {
            spans.get(who).is_some_and(|v| v.iter().any(|&(a, b)| a <= t && t <= b))
        };
        for m in &msgs {
            let recv = tid(&m.info.receiver, &mut tids);
            let wait_track = tid(&format!("{} mailbox", m.info.receiver), &mut tids);
            let send = if covered(&m.info.sender, m.sent_us) {
                tid(&m.info.sender, &mut tids)
            } else {
                main
            };
            let args = json!({"sender": m.info.sender, "receiver": m.info.receiver, "bytes": m.info.bytes,
                "round": m.info.round, "wait_us": m.start_us.saturating_sub(m.sent_us)});
            events.push(
                json!({"name": m.info.message, "cat": "handle", "ph": "X", "pid": 1, "tid": recv,
                "ts": m.start_us, "dur": m.end_us - m.start_us, "args": args}),
            );
            events.push(json!({"name": format!("wait {}", m.info.message), "cat": "mailbox", "ph": "X", "pid": 1,
                "tid": wait_track, "ts": m.sent_us, "dur": m.start_us.saturating_sub(m.sent_us)}));
            events.push(json!({"name": m.info.message, "cat": "flow", "ph": "s", "id": m.id, "pid": 1, "tid": send, "ts": m.sent_us}));
            events.push(json!({"name": m.info.message, "cat": "flow", "ph": "f", "bp": "e", "id": m.id, "pid": 1, "tid": recv, "ts": m.start_us}));
        }
        for f in &fwds {
            let t = tid(&format!("{} forward", f.worker), &mut tids);
            events.push(json!({"name": "forward", "cat": "forward", "ph": "X", "pid": 1, "tid": t, "ts": f.start_us,
                "dur": f.end_us - f.start_us, "args": {"examples": f.examples, "tokens": f.tokens,
                "candidates": f.candidates, "served": f.served}}));
        }
        for ph in &phases {
            let t = tid(&format!("{} compute", ph.actor), &mut tids);
            events.push(json!({"name": ph.phase, "cat": "compute", "ph": "X", "pid": 1, "tid": t,
                "ts": ph.start_us, "dur": ph.end_us - ph.start_us}));
        }
        for (name, t) in &tids {
            events.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": name}}));
        }
        let doc = json!({"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"origin_unix_us": self.origin_unix_us}});
        std::fs::write(path, serde_json::to_vec(&doc)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Microseconds since the profiler started.
    pub fn elapsed_us(&self) -> u64 {
        self.now_us()
    }
}

/// Merges the Chrome traces of several processes (`(label, file)`) into one, a process per
/// input: timestamps moved onto the earliest origin, flow ids kept apart.
pub fn merge_chrome_traces(inputs: &[(String, std::path::PathBuf)], out: &Path) -> Result<()> {
    let mut docs = Vec::new();
    for (label, path) in inputs {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Chrome trace", path.display()))?;
        let origin = doc["otherData"]["origin_unix_us"].as_u64().ok_or_else(|| {
            anyhow::anyhow!("{}: no otherData.origin_unix_us (not a fedbpt trace)", path.display())
        })?;
        docs.push((label, origin, doc));
    }
    let first = docs.iter().map(|d| d.1).min().unwrap_or(0);
    let mut events = Vec::new();
    for (k, (label, origin, doc)) in docs.into_iter().enumerate() {
        let pid = k as u64 + 1;
        let shift = origin - first;
        events
            .push(json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}}));
        for mut e in doc["traceEvents"].as_array().cloned().unwrap_or_default() {
            e["pid"] = json!(pid);
            if let Some(ts) = e["ts"].as_u64() {
                e["ts"] = json!(ts + shift);
            }
            if let Some(id) = e["id"].as_u64() {
                e["id"] = json!(id | (pid << 48));
            }
            events.push(e);
        }
    }
    let doc = json!({"traceEvents": events, "displayTimeUnit": "ms",
        "otherData": {"origin_unix_us": first}});
    std::fs::write(out, serde_json::to_vec(&doc)?)
        .with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_traces_share_one_clock_and_keep_their_flows_apart() {
        let dir = tempfile::tempdir().unwrap();
        let trace = |origin: u64| {
            json!({"traceEvents": [
                {"name": "Train", "cat": "flow", "ph": "s", "id": 1, "pid": 1, "tid": 1, "ts": 10},
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "server"}}
            ], "otherData": {"origin_unix_us": origin}})
        };
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        std::fs::write(&a, trace(5_000).to_string()).unwrap();
        std::fs::write(&b, trace(2_000).to_string()).unwrap();
        let out = dir.path().join("merged.json");
        merge_chrome_traces(&[("serve".into(), a), ("join 1-5".into(), b)], &out).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let events = doc["traceEvents"].as_array().unwrap();
        let flows: Vec<&serde_json::Value> = events.iter().filter(|e| e["cat"] == "flow").collect();
        // The later process's events move by the difference of the origins.
        assert_eq!((flows[0]["pid"].as_u64(), flows[0]["ts"].as_u64()), (Some(1), Some(3_010)));
        assert_eq!((flows[1]["pid"].as_u64(), flows[1]["ts"].as_u64()), (Some(2), Some(10)));
        assert_ne!(flows[0]["id"], flows[1]["id"]);
        let names: Vec<&str> = events
            .iter()
            .filter(|e| e["name"] == "process_name")
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["serve", "join 1-5"]);
        std::fs::write(dir.path().join("plain.json"), r#"{"traceEvents": []}"#).unwrap();
        let e = merge_chrome_traces(&[("x".into(), dir.path().join("plain.json"))], &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain.json") && e.contains("not a fedbpt trace"), "{e}");
    }
}
