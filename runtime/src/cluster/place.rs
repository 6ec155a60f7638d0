//! The location policy: which host an agent asking for a [`Place`] goes to.
//!
//! Power of two choices (Mitzenmacher): draw two hosts that fit at random and take the less
//! loaded. Every host decides alone on loads that are a little old; were each to take the
//! least loaded host it knows, all would send to the same idle host at once (a newly joined
//! one, say) until its next record told them otherwise. Two random draws spread those
//! choices while still avoiding the busy hosts, and a host also counts what it sent to each
//! host since that host's last record.

use super::load::{Facts, Load};
use agent_abi::{Pick, Place};
use rand::RngExt;

/// A host that could be chosen.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    /// Its name.
    pub name: &'a str,
    /// What it told of itself, if anything yet.
    pub facts: Option<&'a Facts>,
    /// Its last load, if known.
    pub load: Option<Load>,
    /// Agents this host sent it since that load.
    pub sent: u32,
}

impl Candidate<'_> {
    fn fits(&self, place: &Place) -> bool {
        let facts = self.facts;
        let draining = self.load.is_some_and(|l| l.draining);
        let arch = place
            .arch
            .as_ref()
            .is_none_or(|a| facts.is_some_and(|f| &f.arch == a));
        let service = place
            .service
            .as_ref()
            .is_none_or(|s| facts.is_some_and(|f| f.services.contains(s)));
        !draining && arch && service
    }

    /// Agents per core, counting those sent since its last load. A host whose load is not
    /// known yet counts as idle.
    fn score(&self) -> f64 {
        let cores = self.facts.map_or(1, |f| f.cores);
        let load = self.load.unwrap_or_default();
        load.per_core(cores) + f64::from(self.sent) / f64::from(cores.max(1))
    }
}

/// The host for `place` among `candidates` (this host, `here`, among them when it is up),
/// or `None` when none fits.
pub fn choose<'a>(
    place: &Place,
    here: &str,
    candidates: &[Candidate<'a>],
    rng: &mut impl rand::Rng,
) -> Option<&'a str> {
    let fits: Vec<&Candidate<'a>> = candidates
        .iter()
        .filter(|c| c.fits(place))
        .filter(|c| place.pick == Pick::LeastLoaded || c.name != here)
        .collect();
    match (place.pick, fits.len()) {
        (_, 0) => None,
        (_, 1) => Some(fits[0].name),
        (Pick::Any, n) => Some(fits[rng.random_range(0..n)].name),
        (Pick::LeastLoaded, n) => {
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..n)) % n;
            let (a, b) = (fits[a], fits[b]);
            // On a tie the agent stays (a hop for nothing costs a freeze), else the first.
            let better = match a.score().total_cmp(&b.score()) {
                std::cmp::Ordering::Equal if b.name == here => b,
                std::cmp::Ordering::Greater => b,
                _ => a,
            };
            Some(better.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn facts(arch: &str) -> Facts {
        Facts {
            arch: arch.into(),
            cores: 2,
            services: vec!["corpus".into()],
        }
    }

    fn load(running: u32) -> Option<Load> {
        Some(Load {
            running,
            ..Load::default()
        })
    }

    #[test]
    fn any_never_stays_and_filters_hold() {
        let (x86, arm) = (facts("x86_64"), facts("aarch64"));
        let hosts = [
            Candidate {
                name: "a",
                facts: Some(&x86),
                load: load(0),
                sent: 0,
            },
            Candidate {
                name: "b",
                facts: Some(&arm),
                load: load(9),
                sent: 0,
            },
            Candidate {
                name: "c",
                facts: None,
                load: None,
                sent: 0,
            },
        ];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_ne!(choose(&Place::any(), "a", &hosts, &mut rng), Some("a"));
            let arm_only = Place::least_loaded().arch("aarch64");
            assert_eq!(choose(&arm_only, "a", &hosts, &mut rng), Some("b"));
        }
        assert_eq!(
            choose(&Place::any().arch("s390x"), "a", &hosts, &mut rng),
            None
        );
        assert_eq!(
            choose(&Place::any().service("mail"), "a", &hosts, &mut rng),
            None
        );
    }

    #[test]
    fn least_loaded_avoids_busy_and_draining_hosts_and_counts_what_it_sent() {
        let f = facts("x86_64");
        let draining = Some(Load {
            draining: true,
            ..Load::default()
        });
        let hosts = [
            Candidate {
                name: "idle",
                facts: Some(&f),
                load: load(0),
                sent: 0,
            },
            Candidate {
                name: "busy",
                facts: Some(&f),
                load: load(40),
                sent: 0,
            },
            Candidate {
                name: "gone",
                facts: Some(&f),
                load: draining,
                sent: 0,
            },
        ];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
        for _ in 0..50 {
            assert_eq!(
                choose(&Place::least_loaded(), "busy", &hosts, &mut rng),
                Some("idle")
            );
        }
        let mut sent = hosts.clone();
        sent[0].sent = 100;
        assert_eq!(
            choose(&Place::least_loaded(), "busy", &sent[..2], &mut rng),
            Some("busy")
        );
    }
}
