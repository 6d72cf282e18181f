//! The run's trace: every fault, node event, invariant check that failed and the engine's
//! warnings, each stamped with the simulated time. A seed's trace is the same, byte for byte,
//! every time it runs; its digest proves it.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

pub struct Trace {
    start: Instant,
    lines: Vec<String>,
}

/// The trace as the tasks of a run share it.
pub type SharedTrace = Arc<Mutex<Trace>>;

impl Trace {
    pub fn new() -> SharedTrace {
        Arc::new(Mutex::new(Trace {
            start: Instant::now(),
            lines: Vec::new(),
        }))
    }

    pub fn push(&mut self, line: impl AsRef<str>) {
        let t = Instant::now().duration_since(self.start);
        self.lines.push(format!(
            "[{:>4}.{:06}] {}",
            t.as_secs(),
            t.subsec_micros(),
            line.as_ref()
        ));
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Simulated time since the run began.
    pub fn elapsed(&self) -> std::time::Duration {
        Instant::now().duration_since(self.start)
    }
}

pub fn lock(t: &SharedTrace) -> MutexGuard<'_, Trace> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a over the trace: equal digests, equal traces.
pub fn digest(lines: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for l in lines {
        for b in l.bytes().chain(std::iter::once(b'\n')) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Sends the engine's and the link's warnings and errors into the trace, tagged with the node
/// whose task logged them (the `node` span every task of a simulated process runs in).
pub struct TraceLayer {
    pub trace: SharedTrace,
    pub verbose: bool,
}

struct NodeName(String);

#[derive(Default)]
struct Fields {
    node: Option<String>,
    text: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "node" {
            self.node = Some(value.to_owned());
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?}");
        } else {
            let _ = write!(self.text, " {}={value:?}", field.name());
        }
    }
}

impl<S> Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let (Some(node), Some(span)) = (f.node, ctx.span(id)) {
            span.extensions_mut().insert(NodeName(node));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        // Warnings and errors always; of the info messages, the takeovers' (how many records
        // they replayed) and, when verbose, all.
        let target = event.metadata().target();
        let wanted = level <= Level::WARN
            || (level <= Level::INFO
                && (self.verbose || target.starts_with("nvmirror::engine::takeover")))
            || (self.verbose && std::env::var_os("NVM_SIM_DEBUG").is_some());
        if !wanted {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let node = ctx
            .event_scope(event)
            .and_then(|scope| {
                scope
                    .from_root()
                    .find_map(|s| s.extensions().get::<NodeName>().map(|n| n.0.clone()))
            })
            .unwrap_or_else(|| "-".into());
        lock(&self.trace).push(format!("{node} {level}: {}", f.text.replace('\n', " ")));
    }
}
