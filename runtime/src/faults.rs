//! Named crash points for the fault-injection tests.
//!
//! With the `failpoints` feature, a host started with `FAILPOINTS=<name>=return` aborts the
//! process at the point named `<name>`, like a power cut: no destructor, no flush, nothing but
//! what was already durable survives. Without the feature (every normal build) a crash point
//! compiles to nothing.
//!
//! The points, in the order a hop passes them:
//!
//! | name | where |
//! |---|---|
//! | `source-after-offer` | source: the destination accepted, nothing sent, the departure record may not be durable yet |
//! | `source-mid-module` | source: half the module sent |
//! | `source-mid-image` | source: half the image sent |
//! | `source-before-departed` | source: image sent, departure durable, DEPARTED not sent |
//! | `dest-after-offer` | destination: ACCEPT sent, nothing received |
//! | `dest-mid-module` | destination: module received, not yet admitted |
//! | `dest-mid-image` | destination: image received, not yet validated or stored |
//! | `dest-before-commit` | destination: agent restored and running, DEPARTED received, not committed |
//! | `dest-after-commit` | destination: arrival committed, the agent still held, COMMITTED not sent |
//! | `source-after-committed` | source: COMMITTED received, departure not yet cleaned up |
//! | `source-after-forward` | source: forwarding pointer (and the report to a home elsewhere) committed, perhaps not yet synced |
//! | `after-call` | any host: a service call journaled, its answer not yet given to the agent |
//! | `after-emit` | any host: the agent's home holds a value it emitted, the agent has not gone on |
//! | `after-send` | any host: the receiver's home holds a message the agent sent, the agent has not gone on |
//! | `home-after-post` | a receiver's home: a message is durably held, its sender not yet told |
//! | `clone-after-keep` | a parent's host: the parent stored with its clone pending, its home not yet told of the children |
//! | `clone-after-register` | a parent's host: the home recorded the children, none made yet |
//! | `home-after-children` | a parent's home: the children durably recorded, the parent's host not yet told |
//! | `clone-after-child` | a parent's host: one child committed on its site, the others perhaps not, the parent not yet stored again |

/// Names of every crash point (kept here so tests and docs agree).
pub const POINTS: [&str; 19] = [
    "source-after-offer",
    "source-mid-module",
    "source-mid-image",
    "source-before-departed",
    "dest-after-offer",
    "dest-mid-module",
    "dest-mid-image",
    "dest-before-commit",
    "dest-after-commit",
    "source-after-committed",
    "source-after-forward",
    "after-call",
    "after-emit",
    "after-send",
    "home-after-post",
    "clone-after-keep",
    "clone-after-register",
    "home-after-children",
    "clone-after-child",
];

/// Reads `FAILPOINTS` from the environment; the returned guard keeps the points configured.
#[cfg(feature = "failpoints")]
pub fn setup() -> Option<fail::FailScenario<'static>> {
    Some(fail::FailScenario::setup())
}

/// Without the `failpoints` feature there is nothing to set up.
#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<()> {
    None
}

/// Aborts the process if the crash point `name` is configured.
#[inline]
pub fn crash_point(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unknown crash point {name}");
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("crash point {name}: aborting the process");
        std::process::abort();
    }
}
