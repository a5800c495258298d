//! Replication of pushes between sites.
//!
//! Out: every manifest pushed to this node's registry is written to a
//! durable **outbox** — one entry per target site, in the same blocking
//! step as the push, before the client hears `201` — for each parent (unless
//! `replication.forward_to_parents = false`) and for each site a matching
//! `[[replication.rules]]` names. A worker offers each entry to its site
//! (`Offer` over the transport); the site pulls what it lacks from us and
//! answers with the tag's state there. Only then is the entry removed, so a
//! push accepted while the site is unreachable (a partition, a restart on
//! either side) is kept and delivered when the link returns. Retries back
//! off per site, up to `replication.retry_max_secs`.
//!
//! In: an `Offer` is imported through [`Registry::import`] from the
//! offering site (then our parents and peers): the manifest, any child
//! manifests, and every blob, chunk by chunk, only what is missing. The tag
//! is set with the offered version unless ours wins (see
//! [`cairn_chunkstore::index::NameEntry::wins_over`]); a change is
//! forwarded on (never back to the sender).
//!
//! Tags carry hybrid-logical-clock versions, so a tag changed on both sides
//! of a partition settles on the same manifest at both: whichever side
//! learns of the other's write keeps the higher `(version, object)`, and an
//! offer answered with a different winner is adopted by the offering side.
//!
//! Outbox entries are store names `outbox/<site>/<repo>:<tag>` (or
//! `…/<repo>@<digest>` when pushed by digest) pointing at a small JSON
//! object; a later push of the same tag replaces the pending entry, since
//! only the tag's latest state needs to travel.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_chunkstore::{ObjectId, PutOptions, Store, StoreError};
use cairn_transport::server::{BoxFuture, Offer, OfferHandler};
use cairn_transport::{Fetcher, PeerAddr, SourceError};
use prometheus::{IntCounterVec, IntGauge, Opts};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ReplicationConfig;
use crate::pullthrough::PullThrough;
use crate::registry::{Pushed, Registry};

/// Prefix of outbox entries in the store's names.
pub const OUTBOX_PREFIX: &str = "outbox/";
/// The replication "repository" of VM images: an offer of repo `@vm`, tag
/// NAME, digest `cairn:<OBJECT>` is VM image NAME. `@` cannot start an OCI
/// repository name, so it never clashes with one; rules match it like a
/// repository (`repos = "@vm"`).
pub const VM_REPO: &str = "@vm";
const VM_DIGEST_PREFIX: &str = "cairn:";
/// How long one offer (the target pulling a whole image) may take.
const OFFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How often the outbox is looked at when nothing wakes the worker.
const IDLE_SCAN: Duration = Duration::from_secs(60);
/// Largest outbox entry read back.
const MAX_ENTRY_BYTES: u64 = 4096;

/// A pending delivery, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    to_addr: SocketAddr,
    to_name: Option<String>,
    repo: String,
    tag: Option<String>,
    digest: String,
    version: u64,
}

impl Entry {
    fn peer(&self) -> PeerAddr {
        PeerAddr {
            addr: self.to_addr,
            name: self.to_name.clone(),
        }
    }
}

fn label(p: &PeerAddr) -> String {
    p.name.clone().unwrap_or_else(|| p.addr.to_string())
}

fn same_site(a: &PeerAddr, b: &PeerAddr) -> bool {
    a.addr == b.addr || (a.name.is_some() && a.name == b.name)
}

/// Replication metrics.
#[derive(Debug, Clone)]
struct Metrics {
    sent: IntCounterVec,
    received: IntCounterVec,
    conflicts: IntCounterVec,
    outbox: IntGauge,
}

impl Metrics {
    fn new(reg: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let sent = IntCounterVec::new(
            Opts::new(
                "cairn_replication_offers_sent_total",
                "Replication offers sent to other sites, by result (ok, error).",
            ),
            &["result"],
        )?;
        let received = IntCounterVec::new(
            Opts::new(
                "cairn_replication_offers_received_total",
                "Replication offers taken from other sites, by result (ok, error).",
            ),
            &["result"],
        )?;
        let conflicts = IntCounterVec::new(
            Opts::new(
                "cairn_replication_tag_conflicts_total",
                "Offers answered with another site's winning tag, by what happened here \
                 (adopted, error).",
            ),
            &["result"],
        )?;
        let outbox = IntGauge::new(
            "cairn_replication_outbox_entries",
            "Pushes waiting to be delivered to another site.",
        )?;
        reg.register(Box::new(sent.clone()))?;
        reg.register(Box::new(received.clone()))?;
        reg.register(Box::new(conflicts.clone()))?;
        reg.register(Box::new(outbox.clone()))?;
        Ok(Self {
            sent,
            received,
            conflicts,
            outbox,
        })
    }
}

/// Sends pushes on to other sites and takes theirs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Replicator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<Store>,
    fetcher: Fetcher,
    registry: Registry,
    cfg: ReplicationConfig,
    parents: Vec<PeerAddr>,
    /// Parents, then peers: where imports look besides the offering site.
    sources: Vec<PeerAddr>,
    notify: Notify,
    /// Serialises outbox writes against the worker's removals.
    outbox_lock: parking_lot::Mutex<()>,
    metrics: Metrics,
    cancel: CancellationToken,
}

/// Outbox entries by target site: (store name, entry object, entry).
type Pending = BTreeMap<String, Vec<(String, ObjectId, Entry)>>;

impl Replicator {
    /// Set up replication for `registry`.
    pub fn new(
        registry: Registry,
        fetcher: Fetcher,
        cfg: ReplicationConfig,
        parents: &[PeerAddr],
        peers: &[PeerAddr],
        prom: &prometheus::Registry,
        cancel: CancellationToken,
    ) -> Result<Self, prometheus::Error> {
        let mut sources = parents.to_vec();
        sources.extend(peers.iter().cloned());
        Ok(Self {
            inner: Arc::new(Inner {
                store: fetcher.store().clone(),
                fetcher,
                registry,
                cfg,
                parents: parents.to_vec(),
                sources,
                notify: Notify::new(),
                outbox_lock: parking_lot::Mutex::new(()),
                metrics: Metrics::new(prom)?,
                cancel,
            }),
        })
    }

    /// Where a push of `repo` goes: the parents (when forwarding), then the
    /// sites of matching rules, each once, never `exclude`.
    fn targets(&self, repo: &str, exclude: Option<&PeerAddr>) -> Vec<PeerAddr> {
        let i = &self.inner;
        let mut out: Vec<PeerAddr> = Vec::new();
        let parents = i.cfg.forward_to_parents.then_some(&i.parents[..]);
        let ruled = i.cfg.rules.iter().filter(|r| r.matches(repo));
        for p in parents
            .into_iter()
            .flatten()
            .chain(ruled.flat_map(|r| r.to.iter()))
        {
            if exclude.is_some_and(|x| same_site(x, p)) || out.iter().any(|o| same_site(o, p)) {
                continue;
            }
            out.push(p.clone());
        }
        out
    }

    /// Record `p` in the outbox for every target (blocking: the caller is
    /// the push itself, which answers its client only after this).
    pub fn enqueue(&self, p: &Pushed, exclude: Option<&PeerAddr>) -> Result<usize, StoreError> {
        let targets = self.targets(&p.repo, exclude);
        if targets.is_empty() {
            return Ok(0);
        }
        let _g = self.inner.outbox_lock.lock();
        for t in &targets {
            let e = Entry {
                to_addr: t.addr,
                to_name: t.name.clone(),
                repo: p.repo.clone(),
                tag: p.tag.clone(),
                digest: p.digest.clone(),
                version: p.version,
            };
            let what = match &p.tag {
                Some(tag) => format!("{}:{tag}", p.repo),
                None => format!("{}@{}", p.repo, p.digest),
            };
            let name = format!("{OUTBOX_PREFIX}{}/{what}", label(t));
            let bytes = serde_json::to_vec(&e).map_err(|e| StoreError::Invalid(e.to_string()))?;
            self.inner.store.put_bytes(
                &bytes,
                &PutOptions {
                    name: Some(name),
                    ..PutOptions::default()
                },
            )?;
        }
        self.inner.metrics.outbox.add(targets.len() as i64);
        debug!(repo = %p.repo, tag = ?p.tag, targets = targets.len(), "push queued for replication");
        self.inner.notify.notify_one();
        Ok(targets.len())
    }

    /// The pending entries, grouped by target site.
    fn pending(&self) -> Result<Pending, StoreError> {
        let mut out: Pending = BTreeMap::new();
        let mut n = 0;
        for (name, e) in self.inner.store.names_with_prefix(OUTBOX_PREFIX)? {
            let rest = &name[OUTBOX_PREFIX.len()..];
            let site = rest.split('/').next().unwrap_or("").to_owned();
            let h = self.inner.store.open_object(&e.object)?;
            if h.len() > MAX_ENTRY_BYTES {
                warn!(%name, "oversized outbox entry; dropping it");
                let _ = self.inner.store.remove(&name);
                continue;
            }
            let mut buf = vec![0u8; h.len() as usize];
            h.read_at(0, &mut buf)?;
            match serde_json::from_slice::<Entry>(&buf) {
                Ok(entry) => {
                    n += 1;
                    out.entry(site).or_default().push((name, e.object, entry));
                }
                Err(err) => {
                    warn!(%name, error = %err, "unreadable outbox entry; dropping it");
                    let _ = self.inner.store.remove(&name);
                }
            }
        }
        self.inner.metrics.outbox.set(n);
        Ok(out)
    }

    /// Remove a delivered entry unless a newer push replaced it meanwhile.
    fn done(&self, name: &str, object: &ObjectId) {
        let _g = self.inner.outbox_lock.lock();
        match self.inner.store.name_entry(name) {
            Ok(Some(e)) if e.object == *object => {
                if let Err(err) = self.inner.store.remove(name) {
                    warn!(%name, error = %err, "removing a delivered outbox entry failed");
                } else {
                    self.inner.metrics.outbox.dec();
                }
            }
            Ok(_) => {}
            Err(err) => warn!(%name, error = %err, "reading an outbox entry failed"),
        }
    }

    /// Run the delivery worker until the node's token is cancelled.
    pub async fn run(self) {
        // Per site: when to try next, and the current retry interval.
        let mut backoff: HashMap<String, (Instant, Duration)> = HashMap::new();
        loop {
            let me = self.clone();
            let pending = match tokio::task::spawn_blocking(move || me.pending()).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the replication outbox failed");
                    BTreeMap::new()
                }
                Err(e) => {
                    warn!(error = %e, "outbox task failed");
                    BTreeMap::new()
                }
            };
            let now = Instant::now();
            let due: Vec<_> = pending
                .into_iter()
                .filter(|(site, _)| backoff.get(site).map_or(true, |(at, _)| *at <= now))
                .collect();
            let results = futures_util::future::join_all(due.into_iter().map(|(site, entries)| {
                let me = self.clone();
                async move {
                    let ok = me.deliver_site(&site, entries).await;
                    (site, ok)
                }
            }));
            let results = tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                r = results => r,
            };
            let max = self.inner.cfg.retry_max;
            for (site, ok) in results {
                if ok {
                    backoff.remove(&site);
                } else {
                    let next = backoff
                        .get(&site)
                        .map_or(Duration::from_secs(1), |(_, d)| (*d * 2).min(max));
                    backoff.insert(site, (Instant::now() + next, next));
                }
            }
            let wake = backoff
                .values()
                .map(|(at, _)| at.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(IDLE_SCAN)
                .min(IDLE_SCAN);
            tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                _ = self.inner.notify.notified() => {}
                _ = tokio::time::sleep(wake) => {}
            }
        }
        debug!("replication worker stopped");
    }

    /// Deliver one site's entries in order; stop at the first failure.
    /// Returns whether all went through.
    async fn deliver_site(&self, site: &str, entries: Vec<(String, ObjectId, Entry)>) -> bool {
        for (name, object, e) in entries {
            match self.deliver(&e).await {
                Ok(()) => {
                    self.inner.metrics.sent.with_label_values(&["ok"]).inc();
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.done(&name, &object)).await;
                }
                Err(err) => {
                    self.inner.metrics.sent.with_label_values(&["error"]).inc();
                    warn!(site, repo = %e.repo, tag = ?e.tag, error = %err,
                        "replication offer failed; will retry");
                    return false;
                }
            }
        }
        true
    }

    async fn deliver(&self, e: &Entry) -> Result<(), String> {
        let peer = e.peer();
        let tag = e.tag.clone().unwrap_or_default();
        let (digest, version) = self
            .inner
            .fetcher
            .offer(&peer, &e.repo, &tag, &e.digest, e.version, OFFER_TIMEOUT)
            .await?;
        info!(site = %label(&peer), repo = %e.repo, tag = %tag, digest = %e.digest,
            "push delivered");
        if tag.is_empty() || (digest == e.digest && version == e.version) {
            return Ok(());
        }
        // The site holds another version of the tag. Import it: if it wins
        // over ours, it replaces ours; if ours won meanwhile, nothing changes.
        if e.repo == VM_REPO {
            let (now, _, changed) = self
                .import_image(&peer, &tag, &digest, version)
                .await
                .map_err(|err| format!("adopting {}'s image {tag}: {err}", label(&peer)))?;
            self.inner
                .metrics
                .conflicts
                .with_label_values(&["adopted"])
                .inc();
            info!(image = %tag, ours = %e.digest, theirs = %digest, %now, "image conflict resolved");
            if changed {
                self.forward(
                    Pushed {
                        repo: VM_REPO.to_owned(),
                        tag: Some(tag.clone()),
                        digest: now,
                        version,
                    },
                    Some(peer),
                )
                .await;
            }
            return Ok(());
        }
        let up = PullThrough::new(
            self.inner.fetcher.clone(),
            std::slice::from_ref(&peer),
            &self.inner.sources,
            self.inner.cancel.child_token(),
        );
        match self
            .inner
            .registry
            .import(&up, &e.repo, Some(&tag), &digest, version)
            .await
        {
            Ok(imp) => {
                self.inner
                    .metrics
                    .conflicts
                    .with_label_values(&["adopted"])
                    .inc();
                info!(repo = %e.repo, %tag, ours = %e.digest, theirs = %digest,
                    now = %imp.digest, "tag conflict resolved");
                if imp.changed {
                    self.forward(
                        Pushed {
                            repo: e.repo.clone(),
                            tag: Some(tag.clone()),
                            digest: imp.digest,
                            version: imp.version,
                        },
                        Some(peer),
                    )
                    .await;
                }
                Ok(())
            }
            Err(err) => {
                self.inner
                    .metrics
                    .conflicts
                    .with_label_values(&["error"])
                    .inc();
                Err(format!(
                    "adopting {}'s {}:{tag}: {err}",
                    label(&peer),
                    e.repo
                ))
            }
        }
    }

    /// Queue `p` for every target but `exclude`, off the async threads.
    async fn forward(&self, p: Pushed, exclude: Option<PeerAddr>) {
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || me.enqueue(&p, exclude.as_ref())).await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "queueing a replicated push failed"),
            Err(e) => warn!(error = %e, "queueing task failed"),
        }
    }

    /// Take an offer: import from the offering site, then forward a change.
    async fn accept(&self, o: Offer) -> Result<(String, u64), String> {
        if o.repo == VM_REPO {
            let (digest, version, changed) = self
                .import_image(&o.from, &o.tag, &o.digest, o.version)
                .await?;
            info!(from = %label(&o.from), image = %o.tag, digest = %o.digest, changed,
                "VM image offer taken");
            if changed {
                self.forward(
                    Pushed {
                        repo: VM_REPO.to_owned(),
                        tag: Some(o.tag.clone()),
                        digest: digest.clone(),
                        version,
                    },
                    Some(o.from.clone()),
                )
                .await;
            }
            return Ok((digest, version));
        }
        let up = PullThrough::new(
            self.inner.fetcher.clone(),
            std::slice::from_ref(&o.from),
            &self.inner.sources,
            self.inner.cancel.child_token(),
        );
        let tag = (!o.tag.is_empty()).then_some(o.tag.as_str());
        let imp = self
            .inner
            .registry
            .import(&up, &o.repo, tag, &o.digest, o.version)
            .await
            .map_err(|e| e.to_string())?;
        info!(from = %label(&o.from), repo = %o.repo, tag = %o.tag, digest = %o.digest,
            changed = imp.changed, "replication offer taken");
        if imp.changed {
            self.forward(
                Pushed {
                    repo: o.repo.clone(),
                    tag: tag.map(str::to_owned),
                    digest: imp.digest.clone(),
                    version: imp.version,
                },
                Some(o.from.clone()),
            )
            .await;
        }
        Ok((imp.digest, imp.version))
    }

    /// A VM image was imported (or a snapshot made) here: give its name a
    /// new version and queue it for the sites the policy names (parents,
    /// and rules matching [`VM_REPO`]). Blocking.
    pub fn announce_image(&self, name: &str, object: &ObjectId) -> Result<usize, StoreError> {
        let version = self.inner.registry.hlc().now();
        let key = crate::vm::store_name(name);
        let (entry, _) = self.inner.store.set_name_versioned(&key, object, version)?;
        self.enqueue(
            &Pushed {
                repo: VM_REPO.to_owned(),
                tag: Some(name.to_owned()),
                digest: format!("{VM_DIGEST_PREFIX}{}", entry.object),
                version: entry.version,
            },
            None,
        )
    }

    /// Import VM image `name` = object `digest` (`cairn:<id>`) at `version`
    /// from `from` (then our parents and peers): recipe and every missing
    /// chunk, at background priority; then the name moves to it unless
    /// ours wins. Returns the name's digest and version afterwards, and
    /// whether it changed.
    async fn import_image(
        &self,
        from: &PeerAddr,
        name: &str,
        digest: &str,
        version: u64,
    ) -> Result<(String, u64, bool), String> {
        crate::vm::validate_name(name).map_err(|e| e.to_string())?;
        let id: ObjectId = digest
            .strip_prefix(VM_DIGEST_PREFIX)
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| format!("bad VM image digest {digest:?}"))?;
        let key = crate::vm::store_name(name);
        let offered = cairn_chunkstore::index::NameEntry {
            object: id,
            version,
            updated_ms: 0,
        };
        if let Some(cur) = self.current_entry(&key).await {
            if (cur.object == id && cur.version == version) || cur.wins_over(&offered) {
                return Ok((
                    format!("{VM_DIGEST_PREFIX}{}", cur.object),
                    cur.version,
                    false,
                ));
            }
        }
        let mut sources = vec![from.clone()];
        sources.extend(
            self.inner
                .sources
                .iter()
                .filter(|s| !same_site(s, from))
                .cloned(),
        );
        self.inner
            .fetcher
            .fetch_object(
                &cairn_transport::wire::ObjectKey::Id(id),
                &sources,
                cairn_transport::wire::Priority::Background,
            )
            .await
            .map_err(|e| e.to_string())?;
        let store = self.inner.store.clone();
        let (entry, changed) = tokio::task::spawn_blocking(move || {
            let (entry, changed) = store.set_name_versioned(&key, &id, version)?;
            store.pin(&key, &entry.object)?;
            Ok::<_, StoreError>((entry, changed))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok((
            format!("{VM_DIGEST_PREFIX}{}", entry.object),
            entry.version,
            changed,
        ))
    }

    async fn current_entry(&self, key: &str) -> Option<cairn_chunkstore::index::NameEntry> {
        let store = self.inner.store.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || store.name_entry(&key).ok().flatten())
            .await
            .ok()
            .flatten()
    }

    /// A weak handle (hooks held by things the replicator holds must not
    /// keep it alive).
    pub fn downgrade(&self) -> WeakReplicator {
        WeakReplicator(Arc::downgrade(&self.inner))
    }

    /// The registry's push hook: queues every push for its targets. It
    /// holds the replicator weakly, because the replicator holds the
    /// registry: a strong reference would be a cycle that keeps the store
    /// (and its RocksDB lock) alive after the node shuts down.
    pub fn push_hook(&self) -> crate::registry::PushHook {
        let weak = Arc::downgrade(&self.inner);
        Arc::new(move |p| match weak.upgrade() {
            Some(inner) => Replicator { inner }
                .enqueue(p, None)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => Err("the node is shutting down".into()),
        })
    }

    /// The transport's handler for `Offer`s.
    pub fn offer_handler(&self) -> Arc<dyn OfferHandler> {
        Arc::new(Sink(self.clone()))
    }
}

/// A [`Replicator`] held weakly.
#[derive(Debug, Clone)]
pub struct WeakReplicator(std::sync::Weak<Inner>);

impl WeakReplicator {
    /// The replicator, while the node runs.
    pub fn upgrade(&self) -> Option<Replicator> {
        self.0.upgrade().map(|inner| Replicator { inner })
    }
}

#[derive(Debug)]
struct Sink(Replicator);

impl OfferHandler for Sink {
    fn offer(&self, offer: Offer) -> BoxFuture<'static, Result<(String, u64), SourceError>> {
        let r = self.0.clone();
        Box::pin(async move {
            let res = r.accept(offer).await;
            let m = &r.inner.metrics.received;
            match &res {
                Ok(_) => m.with_label_values(&["ok"]).inc(),
                Err(_) => m.with_label_values(&["error"]).inc(),
            }
            res.map_err(SourceError)
        })
    }
}
