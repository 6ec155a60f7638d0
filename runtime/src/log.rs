//! An agent's log: lines from `ctx.log` and from its stdout/stderr, kept for the host to drain
//! at each safe point. Bounded, so a flooding agent costs the host a fixed amount of memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Most bytes of log held between two drains; beyond that lines are counted and dropped.
pub const LOG_CAPACITY: usize = 1 << 20;

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// `ctx.log` / `ctx.warn` with the ABI level.
    Agent(i32),
    /// The agent's WASI stdout.
    Stdout,
    /// The agent's WASI stderr.
    Stderr,
}

/// One line of an agent's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Where it came from.
    pub source: LogSource,
    /// The text (lossily decoded UTF-8).
    pub text: String,
}

impl LogLine {
    /// Writes the line to the host's log for `agent`: `ctx.warn` and errors at the levels
    /// operators filter on, the rest at INFO.
    pub fn trace(&self, agent: &dyn std::fmt::Display) {
        let (source, text) = (&self.source, &self.text);
        match self.source {
            LogSource::Agent(agent_abi::level::ERROR) => {
                tracing::error!(agent = %agent, source = ?source, "{text}");
            }
            LogSource::Agent(agent_abi::level::WARN) => {
                tracing::warn!(agent = %agent, source = ?source, "{text}");
            }
            _ => tracing::info!(agent = %agent, source = ?source, "{text}"),
        }
    }
}

#[derive(Debug, Default)]
struct Buffer {
    lines: Vec<LogLine>,
    bytes: usize,
    dropped: u64,
    partial_out: Vec<u8>,
    partial_err: Vec<u8>,
}

/// A bounded, shared log for one agent.
#[derive(Clone, Debug, Default)]
pub struct LogSink {
    inner: Arc<Mutex<Buffer>>,
}

impl LogSink {
    /// Appends a line, or counts it as dropped when the log is full.
    pub fn push(&self, source: LogSource, text: String) {
        let Ok(mut b) = self.inner.lock() else { return };
        if b.bytes + text.len() > LOG_CAPACITY {
            b.dropped += 1;
            return;
        }
        b.bytes += text.len();
        b.lines.push(LogLine { source, text });
    }

    /// Takes the lines logged since the last drain, and how many were dropped.
    pub fn drain(&self) -> (Vec<LogLine>, u64) {
        let Ok(mut b) = self.inner.lock() else {
            return (Vec::new(), 0);
        };
        b.bytes = 0;
        (std::mem::take(&mut b.lines), std::mem::take(&mut b.dropped))
    }

    fn write_stream(&self, source: LogSource, bytes: &[u8]) {
        let complete = {
            let Ok(mut b) = self.inner.lock() else { return };
            let partial = if source == LogSource::Stdout {
                &mut b.partial_out
            } else {
                &mut b.partial_err
            };
            if partial.len() + bytes.len() > agent_abi::MAX_LOG_LINE * 4 {
                partial.clear(); // a line without end: keep memory bounded
            }
            partial.extend_from_slice(bytes);
            let Some(end) = partial.iter().rposition(|b| *b == b'\n') else {
                return;
            };
            let rest = partial.split_off(end + 1);
            std::mem::replace(partial, rest)
        };
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let line = &line[..line.len().min(agent_abi::MAX_LOG_LINE)];
            self.push(source, String::from_utf8_lossy(line).into_owned());
        }
    }

    /// A WASI output stream (stdout or stderr) writing into this log.
    pub(crate) fn stream(&self, source: LogSource) -> LogStream {
        LogStream {
            sink: self.clone(),
            source,
        }
    }
}

/// An agent's stdout or stderr.
#[derive(Clone, Debug)]
pub(crate) struct LogStream {
    sink: LogSink,
    source: LogSource,
}

impl wasmtime_wasi::cli::IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.sink.write_stream(self.source, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_splits_lines_and_the_log_is_bounded() {
        let sink = LogSink::default();
        sink.write_stream(LogSource::Stdout, b"hello\nwor");
        sink.write_stream(LogSource::Stdout, b"ld\n");
        let (lines, dropped) = sink.drain();
        assert_eq!(
            lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["hello", "world"]
        );
        assert_eq!(dropped, 0);
        let line = "x".repeat(1000);
        for _ in 0..(LOG_CAPACITY / 1000 + 10) {
            sink.push(LogSource::Agent(3), line.clone());
        }
        let (lines, dropped) = sink.drain();
        assert_eq!(lines.len(), LOG_CAPACITY / 1000);
        assert_eq!(dropped, 10);
    }
}
