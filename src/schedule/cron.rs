//! Cron expressions in UTC, over the `croner` crate: the one place that turns a schedule's text
//! (or SUBMIT_JOB_SCHED's five fields) into due times. Due times are whole Unix seconds, because
//! the finest cron field is the second and whole seconds make exact claim keys.
//!
//! `croner` rather than `cron`: it reads both the standard 5 fields (minute granularity) and 6
//! fields with a leading seconds field with one parser, and follows Vixie cron for the rest
//! (day of month OR day of week, 0 and 7 both Sunday). `cron` demands the seconds field, so
//! every standard expression would need rewriting first. A year field is refused: neither the
//! issue nor the protocol has one, and a 7th field is more often a typo.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// Why an expression cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// Not a cron expression `croner` accepts (the text says which part).
    #[error("invalid cron expression {expr:?}: {why} (use 5 fields \"min hour day month weekday\", or 6 with a leading seconds field, in UTC)")]
    Invalid { expr: String, why: String },
    /// A valid expression with no due time within the next eight years: one that never
    /// matches (e.g. `0 0 30 2 *`), or a rarer one (a fifth Friday of February that is also
    /// its last day, next in 2036). The search looks no further, to stay cheap.
    #[error("cron expression {0:?} has no due time within the next eight years")]
    NeverDue(String),
    /// A SUBMIT_JOB_SCHED field holding more than one cron field.
    #[error("SUBMIT_JOB_SCHED {field} field {value:?} must be one cron field (a number, *, a range or a list), without spaces")]
    BadField { field: &'static str, value: String },
}

/// A parsed expression and its text.
#[derive(Debug, Clone)]
pub struct CronExpr {
    text: String,
    cron: Cron,
}

impl CronExpr {
    /// Parses 5 fields, or 6 with a leading seconds field; times are UTC.
    pub fn parse(text: &str) -> Result<CronExpr, CronError> {
        Self::parse_with_next(text, now_unix()).map(|(expr, _)| expr)
    }

    /// [`CronExpr::parse`], and the first due time after `now`: refusing an expression that
    /// would fail at every wake-up takes that search, so it is not done twice.
    fn parse_with_next(text: &str, now: u64) -> Result<(CronExpr, u64), CronError> {
        let fields = text.split_ascii_whitespace().count();
        if !(fields == 5 || fields == 6 || text.trim_start().starts_with('@')) {
            return Err(CronError::Invalid {
                expr: text.into(),
                why: format!("{fields} fields"),
            });
        }
        // A list with an empty element (`,`, `1,`, `,,5`) leaves croner a field that matches
        // nothing, and it walks to year 5000 before saying so: seconds of CPU per packet (the
        // gearman_stream fuzz target found it through SUBMIT_JOB_SCHED's hour field `,`).
        if text
            .split_ascii_whitespace()
            .any(|f| f.contains(',') && f.split(',').any(str::is_empty))
        {
            return Err(CronError::Invalid {
                expr: text.into(),
                why: "a list with an empty element".into(),
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(text)
            .map_err(|e| CronError::Invalid {
                expr: text.into(),
                why: e.to_string(),
            })?;
        let expr = CronExpr {
            text: text.trim().to_string(),
            cron,
        };
        // A valid expression that never matches (`0 0 30 2 *`) makes croner walk to year
        // 5000 before it says so: 16-94 ms of CPU, per SUBMIT_JOB_SCHED packet from anyone.
        // Checking the dates of the next eight years first (every leap day included, 2,923
        // cheap tests) refuses it in microseconds; what passes has a due time within them.
        if !expr.matches_a_date_within_eight_years(now) {
            return Err(CronError::NeverDue(expr.text.clone()));
        }
        // Refuse at once what would otherwise fail at every wake-up.
        let next = expr.next_after(now)?;
        Ok((expr, next))
    }

    /// Whether a day of the next eight years (from `t`) matches the date fields and has a
    /// second, minute and hour that match: the time fields are checked once, the dates day by
    /// day with croner's own matcher.
    fn matches_a_date_within_eight_years(&self, t: u64) -> bool {
        use chrono::Datelike;
        let p = &self.cron.pattern;
        let any = |n: u32, f: &dyn Fn(u32) -> Result<bool, croner::errors::CronError>| {
            (0..n).any(|v| f(v).unwrap_or(false))
        };
        if !(any(60, &|v| p.second_match(v))
            && any(60, &|v| p.minute_match(v))
            && any(24, &|v| p.hour_match(v)))
        {
            return false;
        }
        let mut day = to_utc(t).date_naive();
        for _ in 0..(8 * 366) {
            let matched = p.month_match(day.month()).unwrap_or(false)
                && p.day_match(
                    day.year(),
                    day.month(),
                    day.day(),
                    croner::Weekday::from_days_from_sunday(day.weekday().num_days_from_sunday()),
                )
                .unwrap_or(false);
            if matched {
                return true;
            }
            match day.succ_opt() {
                Some(d) => day = d,
                None => return false,
            }
        }
        false
    }

    /// The expression as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first due time strictly after `t` (Unix seconds).
    pub fn next_after(&self, t: u64) -> Result<u64, CronError> {
        let at = to_utc(t);
        self.cron
            .find_next_occurrence(&at, false)
            .map(|d| d.timestamp().max(0) as u64)
            .map_err(|_| CronError::NeverDue(self.text.clone()))
    }

    /// The latest due time at or before `t`, if any (within the search limit).
    pub fn latest_at_or_before(&self, t: u64) -> Option<u64> {
        self.cron
            .find_previous_occurrence(&to_utc(t), true)
            .ok()
            .map(|d| d.timestamp().max(0) as u64)
    }
}

/// The next time matching SUBMIT_JOB_SCHED's fields (minute, hour, day of month, month, day
/// of week, each empty for any), strictly after `now`, as Unix seconds.
pub fn next_sched_epoch(fields: [&[u8]; 5], now: u64) -> Result<u64, CronError> {
    const NAMES: [&str; 5] = ["minute", "hour", "day of month", "month", "day of week"];
    let mut parts = Vec::with_capacity(5);
    for (field, v) in NAMES.into_iter().zip(fields) {
        let s = std::str::from_utf8(v).map_err(|_| CronError::BadField {
            field,
            value: String::from_utf8_lossy(v).into_owned(),
        })?;
        let s = s.trim();
        if s.is_empty() {
            parts.push("*");
        } else if s.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(CronError::BadField {
                field,
                value: s.into(),
            });
        } else {
            parts.push(s);
        }
    }
    CronExpr::parse_with_next(&parts.join(" "), now).map(|(_, next)| next)
}

/// The wall clock as Unix seconds (due times and the last run are wall-clock times, in UTC).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The wall clock as fractional Unix seconds, for lateness.
pub fn now_unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `t` as an RFC 3339 UTC time, for people reading the API.
pub fn rfc3339(t: u64) -> String {
    to_utc(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn to_utc(t: u64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(t.min(i64::MAX as u64) as i64, 0).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-30T08:15:42Z, a Monday.
    const T: u64 = 1_796_026_542;

    #[test]
    fn five_fields_are_minutes_and_six_fields_lead_with_seconds() {
        assert_eq!(rfc3339(T), "2026-11-30T08:15:42Z");
        let every_minute = CronExpr::parse("* * * * *").unwrap();
        assert_eq!(every_minute.next_after(T), Ok(T - 42 + 60));
        let every_2s = CronExpr::parse("*/2 * * * * *").unwrap();
        assert_eq!(every_2s.next_after(T), Ok(T + 2));
        assert_eq!(every_2s.next_after(T + 1), Ok(T + 2));
        let daily = CronExpr::parse("30 2 * * *").unwrap();
        assert_eq!(
            rfc3339(daily.next_after(T).unwrap()),
            "2026-12-01T02:30:00Z"
        );
        assert_eq!(
            rfc3339(daily.latest_at_or_before(T).unwrap()),
            "2026-11-30T02:30:00Z"
        );
        assert_eq!(every_2s.latest_at_or_before(T), Some(T));
    }

    /// A valid expression that never matches used to cost croner's search to year 5000 (16 ms
    /// for `0 0 30 2 *`, 94 ms for `59 23 31 2,4,6,9,11 *`) per SUBMIT_JOB_SCHED packet.
    #[test]
    fn never_due_expressions_are_refused_without_the_long_search() {
        let now = now_unix();
        for f in [
            [&b"0"[..], b"0", b"30", b"2", b""],
            [&b"59"[..], b"23", b"31", b"2,4,6,9,11", b""],
        ] {
            let t = std::time::Instant::now();
            let r = next_sched_epoch(f, now);
            assert!(matches!(r, Err(CronError::NeverDue(_))), "{r:?}");
            // The bounded check is 2,923 bitmask tests; the search it replaces took 16-94 ms.
            assert!(
                t.elapsed() < std::time::Duration::from_millis(10),
                "{:?}",
                t.elapsed()
            );
        }
        // A leap day is due within the eight years looked at, whatever year it is.
        let leap = CronExpr::parse("0 0 29 2 *").unwrap();
        assert!(rfc3339(leap.next_after(T).unwrap()).starts_with("2028-02-29"));
        // A restricted day of week with an impossible day of month still matches (either).
        assert!(CronExpr::parse("0 0 30 2 1").is_ok());
        // Due, but not within eight years (the last day of February 2036 is its fifth
        // Friday): refused, and the error says how far the search looked.
        let e = CronExpr::parse_with_next("0 0 L 2 +5#5", T).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cron expression \"0 0 L 2 +5#5\" has no due time within the next eight years"
        );
    }

    /// The gearman_stream fuzz target's input (a SUBMIT_JOB_SCHED with the hour field `,`)
    /// took 5 s to refuse: croner searched to year 5000 for a field matching nothing.
    #[test]
    fn an_empty_list_element_is_refused_before_any_search() {
        let e = next_sched_epoch([b"", b",", b"", b"", b""], T).unwrap_err();
        assert!(
            matches!(&e, CronError::Invalid { why, .. } if why.contains("empty element")),
            "{e}"
        );
        for bad in ["1, * * * *", "* * ,,5 * *", "0 0 * * 1,,2", ", * * * * *"] {
            let e = CronExpr::parse(bad).unwrap_err();
            assert!(matches!(e, CronError::Invalid { .. }), "{bad:?}: {e}");
        }
        assert!(CronExpr::parse("0 1,13 * * 1,5").is_ok());
    }

    #[test]
    fn bad_expressions_say_what_is_expected() {
        for bad in ["", "* * * *", "* * * * * * 2027", "61 * * * *", "x * * * *"] {
            let e = CronExpr::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid cron expression"), "{bad:?}: {e}");
        }
        assert!(matches!(
            CronExpr::parse("0 0 30 2 *"),
            Err(CronError::NeverDue(_)) | Err(CronError::Invalid { .. })
        ));
    }

    #[test]
    fn submit_job_sched_fields_give_the_next_matching_minute() {
        // Empty fields mean any: the next whole minute.
        assert_eq!(
            next_sched_epoch([b"", b"", b"", b"", b""], T),
            Ok(T - 42 + 60)
        );
        // 09:05 on any day: today, later.
        let t = next_sched_epoch([b"5", b"9", b"", b"", b""], T).unwrap();
        assert_eq!(rfc3339(t), "2026-11-30T09:05:00Z");
        // Sundays (0) at 00:00: the coming Sunday.
        let t = next_sched_epoch([b"0", b"0", b"", b"", b"0"], T).unwrap();
        assert_eq!(rfc3339(t), "2026-12-06T00:00:00Z");
        let e = next_sched_epoch([b"5 9", b"", b"", b"", b""], T).unwrap_err();
        assert!(e.to_string().contains("minute field"), "{e}");
        let e = next_sched_epoch([b"99", b"", b"", b"", b""], T).unwrap_err();
        assert!(e.to_string().contains("invalid cron expression"), "{e}");
    }
}
