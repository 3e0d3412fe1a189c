//! Human sizes on the command line: `512MiB`, `10GiB`, `1Gi`, `4096`.

/// Parses a size. Binary suffixes (`K`, `Ki`, `KiB`, `M`, `Mi`, `MiB`, `G`,
/// `T`..., in either case when a single letter) are powers of 1024; `KB`,
/// `MB`, `GB`, `TB` are powers of 1000, as on a disk's label. A bare number
/// is bytes. A fraction is taken when it makes whole bytes: `1.5GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '_' || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: String = number.chars().filter(|&c| c != '_').collect();
    let (whole, fraction) = number.split_once('.').unwrap_or((&number, ""));
    if whole.is_empty() || fraction.contains('.') {
        return Err(format!("{s:?} is not a size (try 512MiB or 10GiB)"));
    }
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "k" | "Ki" | "KiB" => 1 << 10,
        "M" | "m" | "Mi" | "MiB" => 1 << 20,
        "G" | "g" | "Gi" | "GiB" => 1 << 30,
        "T" | "t" | "Ti" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
            ))
        }
    };
    let too_large = || format!("{s:?}: size too large");
    // Exact arithmetic: digits of whole and fraction as one integer, times
    // the unit, divided by the fraction's power of ten.
    let digits: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| too_large())?;
    let scale = 10u128
        .checked_pow(fraction.len() as u32)
        .ok_or_else(too_large)?;
    let bytes = digits.checked_mul(mult as u128).ok_or_else(too_large)?;
    if bytes % scale != 0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    u64::try_from(bytes / scale).map_err(|_| too_large())
}

/// Formats bytes for people: `1.5 GiB` (the storage layer's own, so
/// daemon and CLI messages read alike).
pub use shorthorn_replica::storage::units::human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1_048_576"), Ok(1 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        // Single letters in either case, and fractions that make whole bytes.
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size("2.5GB"), Ok(2_500_000_000));
        assert!(parse_size("1.5")
            .unwrap_err()
            .contains("whole number of bytes"));
        assert!(parse_size("1.2.3GiB").is_err());
        assert!(parse_size(".5GiB").is_err());
    }

    #[test]
    fn sizes_print() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
