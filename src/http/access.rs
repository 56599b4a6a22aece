//! Who may submit jobs over HTTP. The HTTP listener is often bound to a non-loopback address so
//! Prometheus can scrape `/metrics`, which makes every peer that can scrape it a potential
//! submitter: peers in `server.admin_networks` (the networks already trusted with the admin
//! commands that change state) need nothing more, every other peer needs a bearer token from
//! `http.submit_tokens`, and with no tokens configured (the default) it is refused.
//!
//! Tokens are compared in constant time (`subtle`), against every configured token without an
//! early exit, so response timing does not reveal how much of a guess was right. A token's
//! length is not hidden (unequal lengths compare unequal at once); tokens are at least 16
//! characters (checked at start-up), which leaves nothing useful in that.

use std::net::IpAddr;

use axum::http::{header, HeaderMap};
use ipnet::IpNet;
use subtle::ConstantTimeEq;

use crate::admin::is_admin;

/// The access rule for job submission: admin networks, else a bearer token.
#[derive(Debug, Clone, Default)]
pub struct Access {
    admin_networks: Vec<IpNet>,
    tokens: Vec<Box<[u8]>>,
}

/// Why a request may not submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header (or another scheme).
    NoToken,
    /// A bearer token that is not one of `http.submit_tokens`.
    BadToken,
}

impl Access {
    /// The rule for `admin_networks` and the configured tokens (surrounding blanks trimmed, as
    /// an environment variable or a file may carry them).
    pub fn new(admin_networks: Vec<IpNet>, tokens: &[String]) -> Access {
        Access {
            admin_networks,
            tokens: tokens.iter().map(|t| t.trim().as_bytes().into()).collect(),
        }
    }

    /// Whether a request from `ip` with `headers` may submit.
    pub fn check(&self, ip: IpAddr, headers: &HeaderMap) -> Result<(), Denied> {
        if is_admin(ip, &self.admin_networks) {
            return Ok(());
        }
        let Some(token) = bearer(headers) else {
            return Err(Denied::NoToken);
        };
        // No early exit: every token is compared whatever the outcome.
        let mut ok = subtle::Choice::from(0u8);
        for t in &self.tokens {
            ok |= t.as_ref().ct_eq(token);
        }
        if bool::from(ok) {
            Ok(())
        } else {
            Err(Denied::BadToken)
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 6750).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn admin_networks_need_no_token_and_others_need_a_listed_one() {
        let a = Access::new(
            vec!["10.0.0.0/8".parse().unwrap()],
            &[" 0123456789abcdef ".into(), "fedcba9876543210xx".into()],
        );
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(a.check(inside, &headers(None)), Ok(()));
        assert_eq!(a.check(outside, &headers(None)), Err(Denied::NoToken));
        assert_eq!(
            a.check(outside, &headers(Some("Basic 0123456789abcdef"))),
            Err(Denied::NoToken)
        );
        assert_eq!(
            a.check(outside, &headers(Some("Bearer 0123456789abcdeX"))),
            Err(Denied::BadToken)
        );
        assert_eq!(
            a.check(outside, &headers(Some("Bearer 0123456789abcde"))),
            Err(Denied::BadToken)
        );
        assert_eq!(
            a.check(outside, &headers(Some("bearer 0123456789abcdef"))),
            Ok(())
        );
        assert_eq!(
            a.check(outside, &headers(Some("Bearer fedcba9876543210xx"))),
            Ok(())
        );
    }

    #[test]
    fn no_tokens_configured_refuses_every_outside_peer() {
        let a = Access::new(vec![], &[]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            a.check(ip, &headers(Some("Bearer anything-at-all-here"))),
            Err(Denied::BadToken)
        );
    }
}
