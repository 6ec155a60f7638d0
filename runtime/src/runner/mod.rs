//! The local runner: an agent visits in-process virtual sites, and every hop goes through the
//! full capture → encode → decode → restore path, into an instance holding only the module's
//! initial memory (a fresh one, or the one the agent left at its last hop, reset).
//!
//! This is the agent author's inner loop (`agent run`) and the test bed of the migration
//! mechanism: with [`Migration::EverySafePoint`] or [`Migration::Chosen`] the runner also
//! migrates the agent where it did not ask to move, which must not change its result.
//!
//! A clone's children run beside their parent in the same process ([`family`]), and the
//! agents of a run can message each other.

mod family;

use crate::admission::AdmissionError;
use crate::context::{AgentContext, AgentId};
use crate::driver::{self, CallAnswer, Flow, Place, Start};
use crate::image::{AgentImage, DecodeOptions, EncodeOptions, ImageLimits};
use crate::instance::{AgentError, AgentInstance};
use crate::limits::Limits;
use crate::log::LogLine;
use crate::modules::ModuleCache;
use crate::services::Site;
use agent_abi::{CloneError, Cloned, HopError, OpResult, Outcome};
use family::{Born, Family, Taken};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the site where the local runner launches agents.
pub const HOME_SITE: &str = "home";

/// When the runner moves an agent that did not ask to hop.
pub enum Migration {
    /// Only on `ctx.hop`.
    OnlyHops,
    /// At every safe point: also after each service call and checkpoint, and the runner asks
    /// for every checkpoint.
    EverySafePoint,
    /// At safe point `n` (counted from 1) when the function says so.
    Chosen(Box<dyn FnMut(u64) -> bool + Send>),
}

/// What the launcher asked for.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Sites the agent should visit.
    pub itinerary: Vec<String>,
    /// `--arg` values.
    pub args: BTreeMap<String, String>,
    /// Who launched it.
    pub owner: String,
}

/// One move of the agent from instance to instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopReport {
    /// Hop sequence number after the move.
    pub seq: u64,
    /// Source site.
    pub from: String,
    /// Destination site (the same for an in-place migration).
    pub to: String,
    /// Whether the agent asked for this move (`ctx.hop`).
    pub requested: bool,
    /// Encoded image size.
    pub image_bytes: usize,
    /// Linear memory size.
    pub memory_bytes: u64,
    /// Pages carried (the others equal the module's initial image).
    pub pages: u64,
    /// Capture and encode.
    pub capture: Duration,
    /// Decode and restore.
    pub restore: Duration,
}

/// Something that happened during a run, reported as it happens.
#[derive(Clone, Debug)]
pub enum RunEvent {
    /// The agent moved.
    Moved(HopReport),
    /// A hop the agent asked for did not happen.
    HopFailed {
        /// Where it was.
        site: String,
        /// Why.
        error: HopError,
    },
    /// A log line of the agent.
    Log {
        /// Where it was logged.
        site: String,
        /// The line.
        line: LogLine,
    },
    /// The agent emitted a value for its launcher.
    Emitted {
        /// Where it was.
        site: String,
        /// The value, as JSON (`null` if it has no JSON form).
        value: serde_json::Value,
    },
    /// Log lines dropped because the agent logged too much.
    LogDropped {
        /// How many.
        lines: u64,
    },
    /// The agent cloned itself into children.
    Cloned {
        /// Where it is.
        site: String,
        /// Each child made: its id and its site.
        children: Vec<(String, String)>,
    },
    /// An event of a child (or a later descendant) of the agent.
    Child {
        /// The child's id.
        agent: String,
        /// What happened to it.
        event: Box<RunEvent>,
    },
}

/// The end of a run.
#[derive(Debug)]
pub struct RunReport {
    /// The agent's id.
    pub agent_id: String,
    /// Its result as JSON, or why it did not produce one.
    pub outcome: Result<serde_json::Value, AgentError>,
    /// Every move, in order.
    pub moves: Vec<HopReport>,
    /// What the agent emitted, in order, as JSON (`null` for a value with no JSON form).
    pub emitted: Vec<serde_json::Value>,
    /// Safe points reached.
    pub safe_points: u64,
    /// CPU time used.
    pub cpu: Duration,
    /// Site where the agent ended.
    pub site: String,
    /// The agent it was cloned from, if it is a child.
    pub parent: Option<String>,
    /// Every descendant it cloned, in the order they ended, each with its own report.
    pub children: Vec<RunReport>,
}

impl RunReport {
    fn new(agent_id: String, site: &str, parent: Option<String>) -> RunReport {
        RunReport {
            agent_id,
            outcome: Ok(serde_json::Value::Null),
            moves: Vec::new(),
            emitted: Vec::new(),
            safe_points: 0,
            cpu: Duration::ZERO,
            site: site.to_string(),
            parent,
            children: Vec::new(),
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The module was refused (the reason is in the message, not repeated as a source).
    #[error("module refused: {0}")]
    Admission(AdmissionError),
}

impl From<AdmissionError> for RunError {
    fn from(e: AdmissionError) -> Self {
        RunError::Admission(e)
    }
}

/// Why a hop or clone to a site made unreachable fails.
const UNREACHABLE: &str = "made unreachable for this run (--unreachable)";

/// Runs agents on virtual sites inside this process.
pub struct LocalRunner {
    modules: ModuleCache,
    sites: BTreeMap<String, Arc<Site>>,
    /// Sites a hop to fails as though the network were down (`agent run --unreachable`).
    unreachable: std::collections::BTreeSet<String>,
    limits: Limits,
    image_limits: ImageLimits,
}

impl LocalRunner {
    /// A runner with `sites` (a site named [`HOME_SITE`] is added if missing).
    pub fn new(modules: ModuleCache, sites: Vec<Site>, limits: Limits) -> LocalRunner {
        let mut sites: BTreeMap<String, Arc<Site>> = sites
            .into_iter()
            .map(|s| (s.name().to_string(), Arc::new(s)))
            .collect();
        sites
            .entry(HOME_SITE.to_string())
            .or_insert_with(|| Arc::new(Site::new(HOME_SITE, crate::services::Corpus::empty())));
        let image_limits = ImageLimits {
            max_memory: limits.max_memory,
            ..ImageLimits::default()
        };
        LocalRunner {
            modules,
            sites,
            unreachable: std::collections::BTreeSet::new(),
            limits,
            image_limits,
        }
    }

    /// The same runner, where a hop to any of `sites` fails as unreachable: to try how an
    /// agent copes with a host that is down.
    #[must_use]
    pub fn with_unreachable(mut self, sites: impl IntoIterator<Item = String>) -> LocalRunner {
        self.unreachable.extend(sites);
        self
    }

    /// The module cache (for statistics).
    pub fn modules(&self) -> &ModuleCache {
        &self.modules
    }

    /// Runs `wasm` from launch to end.
    ///
    /// # Errors
    /// [`RunError`] when the module is refused; an agent that fails still yields a report,
    /// with the failure in [`RunReport::outcome`].
    pub async fn run(
        &self,
        wasm: &[u8],
        launch: Launch,
        migration: Migration,
        on_event: &mut (dyn FnMut(&RunEvent) + Send),
    ) -> Result<RunReport, RunError> {
        let module = self.modules.admit(wasm)?;
        let home = self.sites[HOME_SITE].clone();
        let context = AgentContext::new(HOME_SITE, &launch.owner, launch.itinerary, launch.args);
        let id = context.agent_id;
        let mut report = RunReport::new(id.to_string(), HOME_SITE, None);
        let agent = match AgentInstance::launch(module, home, context, &self.limits).await {
            Ok(agent) => agent,
            Err(e) => {
                report.outcome = Err(e);
                return Ok(report);
            }
        };
        let family = Family::new(id, on_event);
        let copies = matches!(migration, Migration::EverySafePoint);
        let mut running: FuturesUnordered<Pin<Box<dyn Future<Output = RunReport> + Send + '_>>> =
            FuturesUnordered::new();
        running.push(Box::pin(self.drive(
            &family,
            Born { agent, report },
            migration,
        )));
        let (mut root, mut children) = (None, Vec::new());
        loop {
            for born in family.newborn() {
                let migration = match copies {
                    true => Migration::EverySafePoint,
                    false => Migration::OnlyHops,
                };
                running.push(Box::pin(self.drive(&family, born, migration)));
            }
            tokio::select! {
                ended = running.next() => match ended {
                    Some(report) if report.parent.is_none() => root = Some(report),
                    Some(report) => children.push(report),
                    None => break,
                },
                () = family.birth() => {}
            }
        }
        let mut report = root.unwrap_or_else(|| RunReport::new(id.to_string(), HOME_SITE, None));
        report.children = children;
        Ok(report)
    }

    /// Runs one agent of a run to its end; its report.
    async fn drive(&self, family: &Family<'_>, born: Born, migration: Migration) -> RunReport {
        let mut place = InProcess {
            runner: self,
            family,
            report: born.report,
            migration,
            move_anyway: false,
        };
        let id = born.agent.context().agent_id;
        driver::drive(born.agent, &mut place, Start::Poll).await;
        // However it stopped, it sends no more: those waiting for it learn so.
        family.ended(id);
        place.report
    }

    /// Moves `agent` to `dest` through an encoded image; the source instance is left intact
    /// so a failure leaves the agent where it was.
    async fn migrate(
        &self,
        agent: &mut AgentInstance,
        dest: Arc<Site>,
        requested: bool,
    ) -> Result<(AgentInstance, HopReport), AgentError> {
        let started = Instant::now();
        let from = agent.site().name().to_string();
        let mut image = agent.capture();
        image.context.hop_seq += 1;
        if requested {
            image.context.record_hop(crate::context::HopRecord {
                seq: image.context.hop_seq,
                from: from.clone(),
                to: dest.name().into(),
            });
        }
        self.arrive(image, dest, (from, requested), started).await
    }

    /// Restores `image`, captured from `from` at `started`, on `dest` through its encoded
    /// bytes.
    async fn arrive(
        &self,
        image: AgentImage,
        dest: Arc<Site>,
        (from, requested): (String, bool),
        started: Instant,
    ) -> Result<(AgentInstance, HopReport), AgentError> {
        let bytes = image
            .encode(EncodeOptions::default())
            .map_err(|e| AgentError::Abi(format!("cannot encode the image: {e}")))?
            .to_vec();
        let capture = started.elapsed();
        let started = Instant::now();
        let image_bytes = bytes.len();
        let image = AgentImage::decode(bytes, &DecodeOptions::new(self.image_limits))?.image;
        let module = self.modules.get(&image.module).ok_or_else(|| {
            AgentError::Instantiate(format!("module {} is not admitted here", image.module))
        })?;
        let (memory_bytes, pages, seq) = (
            image.memory_bytes,
            image.pages.pages(),
            image.context.hop_seq,
        );
        let moved = AgentInstance::restore(module, dest.clone(), image, &self.limits).await?;
        let hop = HopReport {
            seq,
            from,
            to: dest.name().into(),
            requested,
            image_bytes,
            memory_bytes,
            pages,
            capture,
            restore: started.elapsed(),
        };
        Ok((moved, hop))
    }
}

/// The runner as the place an agent runs in: every site is in this process.
struct InProcess<'a, 'e> {
    runner: &'a LocalRunner,
    family: &'a Family<'e>,
    report: RunReport,
    migration: Migration,
    /// Whether the agent moves after its current operation although it did not ask to.
    move_anyway: bool,
}

impl InProcess<'_, '_> {
    /// Tells the launcher `event` of this agent (as a child's, if it is one).
    fn tell(&self, event: RunEvent) {
        let event = match &self.report.parent {
            Some(_) => RunEvent::Child {
                agent: self.report.agent_id.clone(),
                event: Box::new(event),
            },
            None => event,
        };
        self.family.tell(&event);
    }

    /// Makes child `index` of clone `round` of `agent` on `site`, and lets the run start it.
    async fn make_child(
        &mut self,
        agent: &mut AgentInstance,
        (round, index): (u64, u32),
        site: &str,
    ) -> Result<String, CloneError> {
        if self.runner.unreachable.contains(site) {
            let (site, reason) = (site.to_string(), UNREACHABLE.to_string());
            return Err(CloneError::Site(HopError::Unreachable { site, reason }));
        }
        let Some(dest) = self.runner.sites.get(site).cloned() else {
            return Err(CloneError::Site(HopError::UnknownSite(site.to_string())));
        };
        let started = Instant::now();
        let from = agent.site().name().to_string();
        let mut image = agent.capture();
        image.context = image.context.child(round, index, (&from, site));
        let id = image.context.agent_id.to_string();
        let (mut child, hop) = (self.runner.arrive(image, dest, (from, true), started).await)
            .map_err(|e| {
                CloneError::Site(HopError::Refused {
                    site: site.to_string(),
                    reason: e.to_string(),
                })
            })?;
        child.complete(child.context().arrived());
        let parent = Some(agent.context().agent_id.to_string());
        let mut report = RunReport::new(id.clone(), site, parent);
        report.moves.push(hop);
        self.family.born(Born {
            agent: child,
            report,
        });
        Ok(id)
    }
    /// A hop the agent asked for did not happen: it goes on where it is, with the error.
    async fn stay(&mut self, mut agent: AgentInstance, error: HopError) -> Flow {
        self.tell(RunEvent::HopFailed {
            site: agent.site().name().into(),
            error: error.clone(),
        });
        agent.complete(OpResult::Hop(Err(error)));
        self.after_op(agent).await
    }
}

impl Place for InProcess<'_, '_> {
    fn before_poll(&mut self, agent: &mut AgentInstance) {
        if !matches!(self.migration, Migration::OnlyHops) {
            agent.request_checkpoint();
        }
    }

    fn log(&mut self, agent: &AgentInstance, lines: Vec<LogLine>, dropped: u64) {
        self.report.cpu = agent.context().cpu_used();
        self.report.site = agent.site().name().to_string();
        for line in lines {
            self.tell(RunEvent::Log {
                site: agent.site().name().into(),
                line,
            });
        }
        if dropped > 0 {
            self.tell(RunEvent::LogDropped { lines: dropped });
        }
    }

    async fn before_op(&mut self, agent: AgentInstance) -> Flow {
        self.report.safe_points += 1;
        self.move_anyway = match &mut self.migration {
            Migration::OnlyHops => false,
            Migration::EverySafePoint => true,
            Migration::Chosen(choose) => choose(self.report.safe_points),
        };
        Flow::Go(agent)
    }

    async fn hop(&mut self, mut agent: AgentInstance, site: String) -> Flow {
        if self.runner.unreachable.contains(&site) {
            let reason = UNREACHABLE.to_string();
            return self
                .stay(agent, HopError::Unreachable { site, reason })
                .await;
        }
        let Some(dest) = self.runner.sites.get(&site).cloned() else {
            return self.stay(agent, HopError::UnknownSite(site)).await;
        };
        match self.runner.migrate(&mut agent, dest.clone(), true).await {
            Ok((mut moved, hop)) => {
                self.tell(RunEvent::Moved(hop.clone()));
                self.report.moves.push(hop);
                agent.retire();
                moved.complete(OpResult::Hop(Ok(())));
                Flow::Go(moved)
            }
            Err(e) => {
                // Before the destination has the agent, the source keeps it.
                let error = HopError::Refused {
                    site: dest.name().into(),
                    reason: e.to_string(),
                };
                self.stay(agent, error).await
            }
        }
    }

    async fn call(
        &mut self,
        agent: &mut AgentInstance,
        (service, request): (&str, &[u8]),
    ) -> CallAnswer {
        let answer = agent.site().call(service, request);
        answer.map(serde_bytes::ByteBuf::from)
    }

    async fn sleep(&mut self, mut agent: AgentInstance, ms: u64) -> Flow {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        agent.complete(OpResult::Sleep);
        Flow::Go(agent)
    }

    async fn emit(&mut self, mut agent: AgentInstance, value: Vec<u8>) -> Flow {
        let site = agent.site().name().to_string();
        let value = cbor_to_json(&value).unwrap_or_default();
        self.tell(RunEvent::Emitted {
            site,
            value: value.clone(),
        });
        self.report.emitted.push(value);
        agent.context_mut().emits += 1;
        agent.complete(OpResult::Emit(Ok(())));
        Flow::Go(agent)
    }

    /// A message to another agent of the run (a clone's parent or child).
    async fn send(&mut self, mut agent: AgentInstance, to: AgentId, value: Vec<u8>) -> Flow {
        let sent = self.family.send(agent.context().agent_id, to, value);
        agent.complete(OpResult::Send(sent));
        Flow::Go(agent)
    }

    async fn recv(&mut self, mut agent: AgentInstance, timeout_ms: Option<u64>) -> Flow {
        let id = agent.context().agent_id;
        let deadline = timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        match self.family.recv(id, deadline).await {
            Taken::Message(message) => {
                agent.context_mut().received += 1;
                agent.complete(OpResult::Recv(Some(message)));
            }
            Taken::Wait => agent.complete(OpResult::Recv(None)),
            Taken::Alone => {
                let why =
                    "it waits for a message, and no other agent of this local run can send one";
                self.report.outcome = Err(AgentError::Stuck(why.into()));
                return Flow::Stop;
            }
        }
        Flow::Go(agent)
    }

    /// Children run beside their parent in this process, on the virtual sites asked for, as
    /// many in all as a host allows by default.
    async fn clone_to(&mut self, mut agent: AgentInstance, sites: Vec<String>) -> Flow {
        let round = agent.context().clones + 1;
        let mut outcomes = Vec::new();
        let mut made = Vec::new();
        let limit = crate::net::host::DEFAULT_MAX_CHILDREN;
        let over = agent.context().children.saturating_add(sites.len() as u64) > limit;
        for (index, site) in sites.iter().enumerate() {
            if over {
                outcomes.push(Err(CloneError::TooManyChildren { limit }));
                continue;
            }
            let child = self
                .make_child(&mut agent, (round, index as u32), site)
                .await;
            if let Ok(id) = &child {
                made.push((id.clone(), site.clone()));
            }
            outcomes.push(child);
        }
        let context = agent.context_mut();
        context.clones = round;
        context.children += made.len() as u64;
        if !made.is_empty() {
            let site = agent.site().name().to_string();
            self.tell(RunEvent::Cloned {
                site,
                children: made,
            });
        }
        agent.complete(OpResult::Clone(Cloned::Parent(outcomes)));
        Flow::Go(agent)
    }

    async fn after_op(&mut self, mut agent: AgentInstance) -> Flow {
        if !self.move_anyway {
            return Flow::Go(agent);
        }
        let here = agent.site().clone();
        match self.runner.migrate(&mut agent, here, false).await {
            Ok((moved, hop)) => {
                self.tell(RunEvent::Moved(hop.clone()));
                self.report.moves.push(hop);
                agent.retire();
                Flow::Go(moved)
            }
            Err(e) => {
                self.report.outcome = Err(e);
                Flow::Stop
            }
        }
    }

    async fn end(&mut self, _agent: AgentInstance, end: Result<Outcome, AgentError>) {
        self.report.outcome = match end {
            Ok(Outcome::Ok(bytes)) => {
                cbor_to_json(&bytes).map_err(|e| AgentError::Abi(e.to_string()))
            }
            Ok(Outcome::Err(why)) => Err(AgentError::Failed(why)),
            Ok(Outcome::Panicked(why)) => Err(AgentError::Panicked(why)),
            Err(e) => Err(e),
        };
    }
}

/// Converts an agent's CBOR result to JSON for people and scripts.
///
/// # Errors
/// When the bytes are not CBOR or have no JSON form (e.g. non-text map keys).
pub fn cbor_to_json(bytes: &[u8]) -> Result<serde_json::Value, ResultError> {
    let value: ciborium::Value = ciborium::de::from_reader_with_recursion_limit(bytes, 128)
        .map_err(|e| ResultError::NotCbor(e.to_string()))?;
    serde_json::to_value(&value).map_err(ResultError::NoJson)
}

/// Why an agent's result cannot be shown as JSON.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// The bytes are not CBOR (the decoder's error is generic over the reader, so its text
    /// is kept).
    #[error("the agent's result is not valid CBOR: {0}")]
    NotCbor(String),
    /// The value has no JSON form (e.g. non-text map keys).
    #[error("the agent's result has no JSON form: {0}")]
    NoJson(#[source] serde_json::Error),
}
