//! Human durations on the command line: `5s`, `1500ms`, `1.5s`, `2m`.

use std::time::Duration;

/// Parses a duration: a number, then `ms`, `s` or `m` (minutes). A bare
/// number is seconds. Zero is refused: every duration shorthorn takes is a
/// time to wait, and waiting no time at all would fail everything at once.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 5s or 1500ms)"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s or m)")),
    };
    let d = Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?}: too long"))?;
    if d < Duration::from_millis(1) {
        return Err(format!("{s:?}: must be at least 1ms"));
    }
    Ok(d)
}

/// Formats a duration the way [`parse_duration`] reads it back exactly.
pub fn to_arg(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_units_and_bare_seconds() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn refuses_what_is_not_a_wait() {
        for bad in [
            "", "s", "0", "0s", "0.0001s", "-1s", "5h", "5 sec", "1e3s", "1.2.3s",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        assert!(parse_duration("1e30").is_err());
    }

    #[test]
    fn arg_reads_back_the_same() {
        for d in [
            Duration::from_millis(1),
            Duration::from_millis(2500),
            Duration::from_secs(60),
        ] {
            assert_eq!(parse_duration(&to_arg(d)), Ok(d));
        }
    }
}
