//! Access rules on the Gearman port, in the manner of the Zuul gear server's ACLs: each rule names
//! an identity (a client certificate's common name) or a source network (for peers without a
//! certificate) and says which functions it may submit to, which it may register for (CAN_DO),
//! and how much of the admin protocol it may use. Rules are tried in order and the first that
//! matches a connection decides, once, when it connects.
//!
//! With no rules at all (the default) every peer may do everything, as with gearmand: read-only
//! admin commands from anywhere, state-changing ones from `server.admin_networks`. Once rules
//! exist, a peer that no rule matches may do nothing but ask for status and echo.

use std::net::IpAddr;
use std::sync::Arc;

use glob::Pattern;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// How much of the admin text protocol a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAccess {
    /// No admin command at all.
    None,
    /// Read-only commands (`status`, `workers`, `show jobs`, ...).
    Read,
    /// Every command, state-changing ones included, from any network.
    All,
}

/// One `[[access.rules]]` entry as written in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Client certificate common name this rule is for; `*` = any verified certificate.
    pub identity: Option<String>,
    /// Source network (CIDR) this rule is for, for peers without a certificate.
    pub network: Option<String>,
    /// Functions it may submit jobs to (glob patterns: `resize*`, `*`); absent = none.
    pub submit: Option<Vec<String>>,
    /// Functions it may register for with CAN_DO; absent = none.
    pub register: Option<Vec<String>>,
    /// Admin commands; absent = none.
    pub admin: Option<AdminAccess>,
}

/// Why the rules could not be loaded (the server refuses to start).
#[derive(Debug, thiserror::Error)]
#[error("access.rules[{index}]: {why}")]
pub struct AccessError {
    pub index: usize,
    pub why: String,
}

/// What one connection may do, decided when it connects.
#[derive(Debug)]
pub struct Permissions {
    /// The rule that matched, for refusals and logs (`open` when there are no rules).
    pub rule: String,
    /// No rules configured: everything is allowed, admin as without rules.
    open: bool,
    submit: Vec<Pattern>,
    register: Vec<Pattern>,
    admin: AdminAccess,
}

impl Permissions {
    /// Everything allowed (no rules are configured).
    pub fn open() -> Permissions {
        Permissions {
            rule: "open".into(),
            open: true,
            submit: Vec::new(),
            register: Vec::new(),
            admin: AdminAccess::Read,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn may_submit(&self, function: &[u8]) -> bool {
        self.open || matches_any(&self.submit, function)
    }

    pub fn may_register(&self, function: &[u8]) -> bool {
        self.open || matches_any(&self.register, function)
    }

    /// The admin access granted (`Read` when open: state-changing commands then depend on
    /// `server.admin_networks`, as without rules).
    pub fn admin(&self) -> AdminAccess {
        self.admin
    }
}

fn matches_any(patterns: &[Pattern], function: &[u8]) -> bool {
    let Ok(name) = std::str::from_utf8(function) else {
        return false;
    };
    patterns.iter().any(|p| p.matches(name))
}

/// A rule, compiled.
struct Compiled {
    identity: Option<String>,
    network: Option<IpNet>,
    perms: Arc<Permissions>,
}

/// The configured rules.
pub struct Access {
    rules: Vec<Compiled>,
    open: Arc<Permissions>,
    /// What a peer that no rule matches may do: nothing.
    nobody: Arc<Permissions>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Access({} rules)", self.rules.len())
    }
}

impl Access {
    /// Compiles `rules`; each must name exactly one of `identity` and `network`, and its
    /// patterns must parse.
    pub fn new(rules: &[AccessRule]) -> Result<Access, AccessError> {
        let mut out = Vec::with_capacity(rules.len());
        for (index, r) in rules.iter().enumerate() {
            let err = |why: String| AccessError { index, why };
            let network = match (&r.identity, &r.network) {
                (Some(_), None) => None,
                (None, Some(n)) => Some(
                    n.parse::<IpNet>()
                        .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|e| err(format!("network {n:?}: {e}")))?,
                ),
                _ => return Err(err("give exactly one of identity and network".into())),
            };
            let patterns = |what: &str, list: &Option<Vec<String>>| {
                list.iter()
                    .flatten()
                    .map(|p| Pattern::new(p).map_err(|e| err(format!("{what} pattern {p:?}: {e}"))))
                    .collect::<Result<Vec<_>, _>>()
            };
            let label = match (&r.identity, &network) {
                (Some(cn), _) => format!("identity {cn}"),
                (_, Some(n)) => format!("network {n}"),
                _ => unreachable!("checked above"),
            };
            out.push(Compiled {
                identity: r.identity.clone(),
                network,
                perms: Arc::new(Permissions {
                    rule: label,
                    open: false,
                    submit: patterns("submit", &r.submit)?,
                    register: patterns("register", &r.register)?,
                    admin: r.admin.unwrap_or(AdminAccess::None),
                }),
            });
        }
        Ok(Access {
            rules: out,
            open: Arc::new(Permissions::open()),
            nobody: Arc::new(Permissions {
                rule: "no matching rule".into(),
                open: false,
                submit: Vec::new(),
                register: Vec::new(),
                admin: AdminAccess::None,
            }),
        })
    }

    /// What a peer with certificate common name `cn` (if it presented a certificate) from `ip`
    /// may do: the first rule that matches decides. A certificate holder is matched by
    /// identity rules only; a peer without one by network rules only.
    pub fn permissions(&self, cn: Option<&str>, ip: IpAddr) -> Arc<Permissions> {
        if self.rules.is_empty() {
            return self.open.clone();
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let hit = self
            .rules
            .iter()
            .find(|r| match (cn, &r.identity, &r.network) {
                (Some(cn), Some(id), _) => id == "*" || id == cn,
                (None, None, Some(net)) => net.contains(&ip),
                _ => false,
            });
        hit.map_or_else(|| self.nobody.clone(), |r| r.perms.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(identity: Option<&str>, network: Option<&str>) -> AccessRule {
        AccessRule {
            identity: identity.map(str::to_string),
            network: network.map(str::to_string),
            submit: None,
            register: None,
            admin: None,
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_strangers_get_nothing() {
        let mut worker = rule(Some("worker-1"), None);
        worker.register = Some(vec!["resize*".into()]);
        let mut app = rule(None, Some("10.0.0.0/8"));
        app.submit = Some(vec!["resize*".into(), "mail".into()]);
        app.admin = Some(AdminAccess::Read);
        let mut any_cert = rule(Some("*"), None);
        any_cert.submit = Some(vec!["*".into()]);
        let a = Access::new(&[worker, app, any_cert]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        let w = a.permissions(Some("worker-1"), ip("192.168.1.1"));
        assert!(w.may_register(b"resize_small") && !w.may_register(b"mail"));
        assert!(!w.may_submit(b"resize_small"));
        assert_eq!(w.admin(), AdminAccess::None);

        let c = a.permissions(None, ip("::ffff:10.1.2.3"));
        assert!(c.may_submit(b"mail") && c.may_submit(b"resize") && !c.may_submit(b"other"));
        assert!(!c.may_register(b"mail"));
        assert_eq!(c.admin(), AdminAccess::Read);

        let other_cert = a.permissions(Some("someone"), ip("10.0.0.1"));
        assert!(other_cert.may_submit(b"anything") && !other_cert.may_register(b"x"));

        let stranger = a.permissions(None, ip("192.168.1.1"));
        assert!(!stranger.may_submit(b"mail") && !stranger.may_register(b"mail"));
        assert_eq!(stranger.admin(), AdminAccess::None);
        assert!(!stranger.may_submit(&[0xff, 0xfe]));
    }

    #[test]
    fn no_rules_means_open_and_bad_rules_are_refused() {
        let a = Access::new(&[]).unwrap();
        let p = a.permissions(None, "1.2.3.4".parse().unwrap());
        assert!(p.is_open() && p.may_submit(b"x") && p.may_register(b"y"));
        assert!(Access::new(&[rule(None, None)]).is_err());
        assert!(Access::new(&[rule(Some("a"), Some("10.0.0.0/8"))]).is_err());
        let e = Access::new(&[rule(None, Some("10.0.0.0/33"))])
            .err()
            .unwrap();
        assert!(e.to_string().contains("access.rules[0]"), "{e}");
        let mut bad = rule(Some("a"), None);
        bad.submit = Some(vec!["[".into()]);
        assert!(Access::new(&[bad]).is_err());
    }
}
