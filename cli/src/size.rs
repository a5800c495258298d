//! Human byte sizes: parsing `10G`/`512MiB` and printing `1.5 GiB`.

/// Parse a size: a number with an optional K/M/G/T suffix (powers of 1024,
/// with or without `iB`/`B`). The node's config parser, so flags and config
/// files agree.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    cairn_node::config::parse_size(s)
}

/// Print a byte count with a binary unit.
pub(crate) fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("77"), Ok(77));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12), "12 B");
    }
}
