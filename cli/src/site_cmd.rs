//! `cairn site ...`, against a running node's API: the sites this node
//! knows (itself, its parents, peers and whatever the metadata exchange
//! brought in), their state, labels, capacity, RTT and inventory.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::image_cmd::client;

/// `cairn site ...`.
#[derive(Debug, clap::Args)]
pub(crate) struct SiteArgs {
    /// The node's API (the node's --api-listen address).
    #[arg(
        long,
        env = "CAIRN_API",
        default_value = "http://127.0.0.1:7480",
        global = true
    )]
    api: String,
    /// Print the API's JSON (pretty) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: SiteCmd,
}

#[derive(Debug, clap::Subcommand)]
enum SiteCmd {
    /// List every site the node knows, sorted by name; the node's own site
    /// is marked with `*`.
    ///
    /// Columns: SITE, STATE (self, up, suspect, down, unknown), REGION,
    /// KIND, PARENT, RTT (measured from this node, else `~` and the
    /// estimate from network coordinates, else `-`), DISK FREE/TOTAL,
    /// OBJECTS (complete/total inventory entries the site holds) and
    /// LAST HEARD (age of its latest heartbeat).
    Ls,
    /// Show every field the node knows about one site: state, labels
    /// (region, zone, kind and extra labels), location, parent, capacity,
    /// heartbeat, RTT and inventory.
    Show {
        /// Site name (see `cairn site ls`).
        name: String,
    },
}

/// A site as `GET /api/v1/sites[/NAME]` shows it. Lenient about optional
/// parts so an answer with fewer fields still prints.
#[derive(Debug, Clone, Deserialize)]
struct Site {
    name: String,
    state: String,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    geo: Option<Geo>,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    capacity: Capacity,
    #[serde(default)]
    heartbeat: Option<Heartbeat>,
    #[serde(default)]
    last_heard_ms_ago: Option<u64>,
    #[serde(default)]
    rtt_ms: Option<f64>,
    #[serde(default)]
    rtt_est_ms: Option<f64>,
    #[serde(default)]
    objects: u64,
    #[serde(default)]
    complete: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Labels {
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct Geo {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Capacity {
    #[serde(default)]
    disk_total: u64,
    #[serde(default)]
    disk_free: u64,
    #[serde(default)]
    cache_budget: u64,
    #[serde(default)]
    cpu_millis: u64,
    #[serde(default)]
    mem_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct Heartbeat {
    counter: u64,
    wall_ms: u64,
}

/// `GET /api/v1/sites`.
#[derive(Debug, Clone, Deserialize)]
struct SiteList {
    site: String,
    sites: Vec<Site>,
}

pub(crate) fn run(args: SiteArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let (url, what) = match &args.cmd {
        SiteCmd::Ls => (sites_url(&args.api, None)?, "the site list".to_owned()),
        SiteCmd::Show { name } => (sites_url(&args.api, Some(name))?, format!("site {name:?}")),
    };
    let body = rt.block_on(get(&args.api, url))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let malformed = || {
        format!(
            "malformed answer from the node's API at {} ({what})",
            args.api
        )
    };
    match &args.cmd {
        SiteCmd::Ls => {
            let list: SiteList = serde_json::from_value(body).with_context(malformed)?;
            print!("{}", format_ls(&list));
        }
        SiteCmd::Show { .. } => {
            let site: Site = serde_json::from_value(body).with_context(malformed)?;
            print!("{}", format_show(&site));
        }
    }
    Ok(())
}

/// `API/api/v1/sites`, or `.../sites/NAME` with NAME percent-encoded as one
/// path segment.
fn sites_url(api: &str, name: Option<&str>) -> anyhow::Result<reqwest::Url> {
    let base = format!("{}/api/v1/sites", api.trim_end_matches('/'));
    let mut url = reqwest::Url::parse(&base)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .with_context(|| format!("--api {api:?} is not a URL (e.g. http://127.0.0.1:7480)"))?;
    if let Some(n) = name {
        if n.is_empty() {
            bail!("the site name is empty");
        }
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("--api {api:?} cannot take a path"))?
            .push(n);
    }
    Ok(url)
}

/// GET `url`: the JSON body, or an error that says what went wrong (node
/// unreachable, the API's own error message, an answer that is not JSON).
async fn get(api: &str, url: reqwest::Url) -> anyhow::Result<serde_json::Value> {
    let r = client()?.get(url.clone()).send().await.with_context(|| {
        format!(
            "cannot reach the node's API at {api}; is a node running there with an \
             API listener (`cairn node --api-listen ADDR`, default 127.0.0.1:7480)?"
        )
    })?;
    let status = r.status();
    let text = r
        .text()
        .await
        .with_context(|| format!("reading the answer of the node's API at {api}"))?;
    parse_answer(status.as_u16(), &text, url.path())
}

/// The body of an answer with HTTP status `status` to a request for `path`.
fn parse_answer(status: u16, text: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let body: Option<serde_json::Value> = serde_json::from_str(text).ok();
    if (200..300).contains(&status) {
        return body.with_context(|| {
            format!("malformed answer from the node's API: {path} answered {status} without JSON")
        });
    }
    match body.as_ref().and_then(|b| b["error"].as_str()) {
        Some(e) => bail!("{e}"),
        None if status == 404 => bail!(
            "the node's API has no {path} (404 without an error message); \
             is the node too old for `cairn site`?"
        ),
        None => bail!("the node's API answered {status} to {path}"),
    }
}

fn or_dash(s: Option<&str>) -> &str {
    match s {
        Some(s) if !s.is_empty() => s,
        _ => "-",
    }
}

/// A duration in milliseconds, e.g. `0.4 ms`, `12.3 ms`, `230 ms`.
fn ms(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// The RTT column: measured, else `~` and the estimate, else `-`.
fn rtt_cell(s: &Site) -> String {
    match (s.rtt_ms, s.rtt_est_ms) {
        (Some(m), _) => ms(m),
        (None, Some(e)) => format!("~{}", ms(e)),
        (None, None) => "-".to_owned(),
    }
}

/// An age, e.g. `850ms`, `1.2s`, `5m03s`, `2h10m`, `3d04h`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600)
    }
}

fn disk_cell(c: &Capacity) -> String {
    if c.disk_total == 0 && c.disk_free == 0 {
        return "-".to_owned();
    }
    format!(
        "{}/{}",
        crate::size::human(c.disk_free),
        crate::size::human(c.disk_total)
    )
}

/// The `site ls` table: sorted by name, the local site marked `*`.
fn format_ls(list: &SiteList) -> String {
    const HEAD: [&str; 9] = [
        "SITE",
        "STATE",
        "REGION",
        "KIND",
        "PARENT",
        "RTT",
        "DISK FREE/TOTAL",
        "OBJECTS",
        "LAST HEARD",
    ];
    // Right-aligned: the numeric columns.
    const RIGHT: [bool; 9] = [false, false, false, false, false, true, true, true, true];
    let mut sites: Vec<&Site> = list.sites.iter().collect();
    sites.sort_by(|a, b| a.name.cmp(&b.name));
    let rows: Vec<[String; 9]> = sites
        .iter()
        .map(|s| {
            let me = s.name == list.site;
            [
                format!("{}{}", if me { "* " } else { "  " }, s.name),
                s.state.clone(),
                or_dash(s.labels.region.as_deref()).to_owned(),
                or_dash(s.labels.kind.as_deref()).to_owned(),
                or_dash(s.parent.as_deref()).to_owned(),
                rtt_cell(s),
                disk_cell(&s.capacity),
                format!("{}/{}", s.complete, s.objects),
                match s.last_heard_ms_ago {
                    Some(a) if !me => format!("{} ago", age(a)),
                    _ => "-".to_owned(),
                },
            ]
        })
        .collect();
    let mut head = HEAD.map(str::to_owned);
    head[0] = format!("  {}", head[0]);
    let mut width = [0usize; 9];
    for r in std::iter::once(&head).chain(rows.iter()) {
        for (w, c) in width.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(rows.iter()) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width[i].saturating_sub(c.chars().count());
            if RIGHT[i] {
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if sites.is_empty() {
        out.push_str("  (no sites known yet)\n");
    }
    out
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian,
/// UTC).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// `site show`: one `key: value` line per field, values aligned.
fn format_show(s: &Site) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: String| lines.push((k.to_owned(), v));
    add("name", s.name.clone());
    add(
        "state",
        if s.state == "self" {
            "self (this node's site)".to_owned()
        } else {
            s.state.clone()
        },
    );
    add("region", or_dash(s.labels.region.as_deref()).to_owned());
    add("zone", or_dash(s.labels.zone.as_deref()).to_owned());
    add("kind", or_dash(s.labels.kind.as_deref()).to_owned());
    for (k, v) in &s.labels.extra {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        add(&format!("label {k}"), v);
    }
    if let Some(g) = &s.geo {
        add("geo", format!("{:.4}, {:.4}", g.lat, g.lon));
    }
    add("parent", or_dash(s.parent.as_deref()).to_owned());
    let c = &s.capacity;
    let bytes = |n: u64| {
        if n == 0 {
            "-".to_owned()
        } else {
            format!("{} ({n} bytes)", crate::size::human(n))
        }
    };
    add("disk total", bytes(c.disk_total));
    add("disk free", bytes(c.disk_free));
    add("cache budget", bytes(c.cache_budget));
    add(
        "cpu",
        if c.cpu_millis == 0 {
            "-".to_owned()
        } else {
            format!(
                "{} millicores ({:.1} CPUs)",
                c.cpu_millis,
                c.cpu_millis as f64 / 1000.0
            )
        },
    );
    add("memory", bytes(c.mem_bytes));
    match &s.heartbeat {
        Some(h) => add(
            "heartbeat",
            format!("#{} at {} ({})", h.counter, utc(h.wall_ms), h.wall_ms),
        ),
        None => add("heartbeat", "-".to_owned()),
    }
    add(
        "last heard",
        match s.last_heard_ms_ago {
            Some(a) => format!("{} ago", age(a)),
            None => "-".to_owned(),
        },
    );
    add("rtt", s.rtt_ms.map_or_else(|| "-".to_owned(), ms));
    add(
        "rtt estimate",
        s.rtt_est_ms.map_or_else(|| "-".to_owned(), ms),
    );
    add(
        "objects",
        format!("{} ({} complete)", s.objects, s.complete),
    );
    let w = lines
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    let mut out = String::new();
    for (k, v) in &lines {
        let _ = writeln!(out, "{:<w$} {v}", format!("{k}:"), w = w);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "site": "core",
      "sites": [
        {"name": "edge1", "state": "up",
         "labels": {"region": "eu", "zone": "a", "kind": "edge", "extra": {"rack": "r7"}},
         "geo": {"lat": 48.1, "lon": 11.5},
         "parent": "core",
         "capacity": {"disk_total": 107374182400, "disk_free": 53687091200,
                      "cache_budget": 21474836480, "cpu_millis": 4000, "mem_bytes": 8589934592},
         "heartbeat": {"counter": 12, "wall_ms": 1796230000000},
         "last_heard_ms_ago": 1200,
         "rtt_ms": 0.4, "rtt_est_ms": 0.5,
         "objects": 3, "complete": 2},
        {"name": "core", "state": "self",
         "labels": {"region": "eu", "zone": "", "kind": "core", "extra": {}},
         "geo": null, "parent": null,
         "capacity": {"disk_total": 1099511627776, "disk_free": 824633720832,
                      "cache_budget": 0, "cpu_millis": 0, "mem_bytes": 0},
         "heartbeat": {"counter": 40, "wall_ms": 1796230001000},
         "last_heard_ms_ago": null, "rtt_ms": null, "rtt_est_ms": null,
         "objects": 10, "complete": 10},
        {"name": "edge2", "state": "suspect",
         "labels": {"region": "us", "zone": "b", "kind": "edge", "extra": {}},
         "geo": null, "parent": "core",
         "capacity": {"disk_total": 0, "disk_free": 0, "cache_budget": 0,
                      "cpu_millis": 0, "mem_bytes": 0},
         "heartbeat": {"counter": 3, "wall_ms": 1796229000000},
         "last_heard_ms_ago": 125000, "rtt_ms": null, "rtt_est_ms": 87.31,
         "objects": 0, "complete": 0},
        {"name": "far", "state": "down",
         "labels": {"region": "", "zone": "", "kind": "", "extra": {}},
         "geo": null, "parent": null,
         "capacity": {"disk_total": 0, "disk_free": 0, "cache_budget": 0,
                      "cpu_millis": 0, "mem_bytes": 0},
         "heartbeat": {"counter": 1, "wall_ms": 1796000000000},
         "last_heard_ms_ago": 230000000, "rtt_ms": null, "rtt_est_ms": null,
         "objects": 0, "complete": 0}
      ]
    }"#;

    fn sample() -> SiteList {
        serde_json::from_str(SAMPLE).unwrap()
    }

    #[test]
    fn ls_table() {
        let t = format_ls(&sample());
        let expected = [
            "  SITE   STATE    REGION  KIND  PARENT       RTT     DISK FREE/TOTAL  OBJECTS  LAST HEARD",
            "* core   self     eu      core  -              -   768.0 GiB/1.0 TiB    10/10           -",
            "  edge1  up       eu      edge  core      0.4 ms  50.0 GiB/100.0 GiB      2/3    1.2s ago",
            "  edge2  suspect  us      edge  core    ~87.3 ms                   -      0/0   2m05s ago",
            "  far    down     -       -     -              -                   -      0/0   2d15h ago",
            "",
        ]
        .join("\n");
        assert_eq!(t, expected, "\n{t}");
    }

    #[test]
    fn ls_empty() {
        let l = SiteList {
            site: "x".into(),
            sites: vec![],
        };
        let t = format_ls(&l);
        assert!(t.starts_with("  SITE  STATE"), "{t}");
        assert!(t.contains("(no sites known yet)"), "{t}");
    }

    #[test]
    fn show_fields() {
        let list = sample();
        let edge1 = list.sites.iter().find(|s| s.name == "edge1").unwrap();
        let t = format_show(edge1);
        let expected = "\
name:         edge1
state:        up
region:       eu
zone:         a
kind:         edge
label rack:   r7
geo:          48.1000, 11.5000
parent:       core
disk total:   100.0 GiB (107374182400 bytes)
disk free:    50.0 GiB (53687091200 bytes)
cache budget: 20.0 GiB (21474836480 bytes)
cpu:          4000 millicores (4.0 CPUs)
memory:       8.0 GiB (8589934592 bytes)
heartbeat:    #12 at 2026-12-02T16:46:40.000Z (1796230000000)
last heard:   1.2s ago
rtt:          0.4 ms
rtt estimate: 0.5 ms
objects:      3 (2 complete)
";
        assert_eq!(t, expected, "\n{t}");
        let core = list.sites.iter().find(|s| s.name == "core").unwrap();
        let t = format_show(core);
        assert!(t.contains("state:        self (this node's site)\n"), "{t}");
        assert!(!t.contains("geo:"), "{t}");
        assert!(t.contains("parent:       -\n"), "{t}");
        assert!(t.contains("rtt:          -\n"), "{t}");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_796_230_000_000), "2026-12-02T16:46:40.000Z");
    }

    #[test]
    fn answers() {
        let v = parse_answer(200, r#"{"site":"a","sites":[]}"#, "/api/v1/sites").unwrap();
        assert_eq!(v["site"], "a");
        let e = parse_answer(
            404,
            r#"{"error":"no site named \"nope\" is known here"}"#,
            "/api/v1/sites/nope",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), r#"no site named "nope" is known here"#);
        let e = parse_answer(404, "", "/api/v1/sites").unwrap_err();
        assert!(e.to_string().contains("has no /api/v1/sites"), "{e}");
        let e = parse_answer(200, "<html>", "/api/v1/sites").unwrap_err();
        assert!(e.to_string().contains("malformed answer"), "{e}");
        let e = parse_answer(500, "oops", "/api/v1/sites").unwrap_err();
        assert!(e.to_string().contains("answered 500"), "{e}");
        // JSON of the wrong shape: a clear error, no panic.
        let bad: Result<SiteList, _> = serde_json::from_str(r#"{"site":"a","sites":[{"x":1}]}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            sites_url("http://h:7480/", None).unwrap().as_str(),
            "http://h:7480/api/v1/sites"
        );
        assert_eq!(
            sites_url("http://h:7480", Some("a b/c")).unwrap().as_str(),
            "http://h:7480/api/v1/sites/a%20b%2Fc"
        );
        let e = sites_url("127.0.0.1:7480", None).unwrap_err();
        assert!(e.to_string().contains("is not a URL"), "{e}");
        let e = sites_url("localhost:7480", None).unwrap_err();
        assert!(e.to_string().contains("is not a URL"), "{e}");
        assert!(sites_url("http://h", Some("")).is_err());
    }

    #[test]
    fn cells() {
        assert_eq!(age(999), "999ms");
        assert_eq!(age(59_999), "60.0s");
        assert_eq!(age(3_600_000), "1h00m");
        assert_eq!(ms(230.4), "230 ms");
    }
}
