//! Serve a RAM disk over NBD, for trying clients by hand and for rough
//! throughput checks (not a benchmark of the chunk-store exports).
//!
//! ```text
//! cargo run --release -p cairn-nbd --example ramdisk -- [PORT] [SIZE_MIB] [FILE]
//! ```
//!
//! Exports `ram` (writable, SIZE_MIB MiB, default 1024, filled with a
//! pattern) and, with FILE, `file` (read-only, the file's bytes) on
//! 127.0.0.1:PORT (default 10809) until Ctrl-C.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use cairn_nbd::server::{serve_with_stats, ServerLimits, ServerStats};
use cairn_nbd::{BoxFuture, Export, ExportError, ExportProvider, OpenError};
use tokio_util::sync::CancellationToken;

struct Ram(RwLock<Vec<u8>>);

impl Export for Ram {
    fn size(&self) -> u64 {
        self.0.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        false
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move {
            let d = self.0.read().map_err(|_| ExportError::io("poisoned"))?;
            let o = offset as usize;
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        })
    }

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        _fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let mut d = self.0.write().map_err(|_| ExportError::io("poisoned"))?;
            let o = offset as usize;
            d[o..o + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }
}

struct File(std::fs::File, u64);

impl Export for File {
    fn size(&self) -> u64 {
        self.1
    }

    fn read_only(&self) -> bool {
        true
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move { Ok(self.0.read_exact_at(buf, offset)?) })
    }
}

struct Provider(HashMap<String, Arc<dyn Export>>);

impl ExportProvider for Provider {
    fn list(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Arc<dyn Export>, OpenError>> {
        Box::pin(async move { self.0.get(name).cloned().ok_or(OpenError::Unknown) })
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10809);
    let mib: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    let mut exports: HashMap<String, Arc<dyn Export>> = HashMap::new();
    exports.insert("ram".into(), Arc::new(Ram(RwLock::new(data))));
    if let Some(path) = args.get(3) {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        exports.insert("file".into(), Arc::new(File(f, len)));
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let stats = Arc::new(ServerStats::default());
    let cancel = CancellationToken::new();
    let server = tokio::spawn(serve_with_stats(
        listener,
        Arc::new(Provider(exports)),
        cancel.clone(),
        ServerLimits::default(),
        stats.clone(),
    ));
    eprintln!("serving nbd://127.0.0.1:{port}/ram ({mib} MiB); Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    cancel.cancel();
    let _ = server.await;
    eprintln!("{:#?}", stats.snapshot());
    Ok(())
}
