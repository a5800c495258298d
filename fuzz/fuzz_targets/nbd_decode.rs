#![no_main]
//! Hostile bytes into the NBD server state machine: the handshake, then
//! transmission. The first byte picks the piece size the input is fed in
//! (low 6 bits) and a prefix (high 2 bits): none, or a valid handshake into
//! transmission (simple replies on a writable export; structured replies
//! and `base:allocation`; `NBD_OPT_EXPORT_NAME` on a read-only export), so
//! the fuzzer reaches request decoding without first finding the magics.
//! Every event is answered the way a server would. Nothing may panic, no
//! error may leave the machine open, and every reply encoder must accept
//! what the machine hands out.
use bytes::{BufMut, BytesMut};
use cairn_nbd::consts::*;
use cairn_nbd::proto::{
    encode_block_status_reply, encode_error_reply, encode_ok_reply, encode_option,
    encode_read_reply_header, normalize_extents, Event, ExportInfo, Extent, Op, ProtoConfig,
    Refusal, ServerProto,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(first % 64) + 1;
    let mut input = prefix(first >> 6);
    input.extend_from_slice(rest);
    // Small limits so the over-limit paths are reachable.
    let mut p = ServerProto::new(ProtoConfig {
        max_option_len: 512,
        max_request_len: 4096,
        max_skip_len: 16384,
    });
    let mut out = p.take_output();
    for chunk in input.chunks(piece) {
        p.feed(chunk);
        loop {
            match p.poll() {
                Ok(Some(event)) => {
                    if answer(&mut p, event, &mut out).is_err() {
                        assert!(p.is_closed());
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(p.is_closed());
                    return;
                }
            }
            out.extend_from_slice(&p.take_output());
            if out.len() > 1 << 20 {
                out.clear();
            }
        }
    }
});

fn answer(p: &mut ServerProto, event: Event, out: &mut BytesMut) -> Result<(), ()> {
    match event {
        Event::ListExports => p.answer_list(&["disk", "ro", ""]),
        Event::ExportQuery { name, .. } => {
            let info = match name.as_str() {
                "" | "disk" => Ok(ExportInfo::new(1 << 20)),
                "ro" => Ok(ExportInfo {
                    read_only: true,
                    multi_conn: true,
                    description: Some("read-only".into()),
                    ..ExportInfo::new(12345)
                }),
                "bye" => Err(Refusal::Shutdown),
                _ => Err(Refusal::Unknown("no such export".into())),
            };
            p.answer_export(info).map_err(|_| ())?;
        }
        Event::Request(req) => {
            let info = p.export().expect("transmission has an export");
            let end = req.offset.checked_add(u64::from(req.length));
            assert!(end.is_some_and(|e| e <= info.size) || req.op == Op::Flush);
            let structured = p.structured_replies();
            match &req.op {
                Op::Read => {
                    assert!(req.length <= p.config().max_request_len);
                    encode_read_reply_header(out, structured, req.cookie, req.offset, req.length);
                }
                Op::Write(payload) => {
                    assert!(!info.read_only);
                    assert_eq!(payload.len(), req.length as usize);
                    encode_ok_reply(out, req.cookie);
                }
                Op::BlockStatus => {
                    let ctx = p
                        .allocation_context()
                        .expect("block status needs a context");
                    let extents = normalize_extents(
                        &[Extent::data(req.length / 3), Extent::hole(req.length)],
                        req.length,
                        req.req_one(),
                    );
                    assert!(!extents.is_empty());
                    assert!(
                        extents.iter().map(|e| u64::from(e.length)).sum::<u64>()
                            <= u64::from(req.length)
                    );
                    encode_block_status_reply(out, req.cookie, ctx, &extents);
                }
                _ => encode_error_reply(out, structured, req.cookie, cairn_nbd::Errno::Io, "fuzz"),
            }
        }
        Event::Abort | Event::Disconnect => assert!(p.is_closed()),
        Event::Rejected { .. } => {}
    }
    Ok(())
}

/// A valid client handshake ending in transmission, by mode.
fn prefix(mode: u8) -> Vec<u8> {
    let mut b = BytesMut::new();
    if mode == 0 {
        return Vec::new();
    }
    b.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let name: &[u8] = if mode == 3 { b"ro" } else { b"disk" };
    if mode >= 2 {
        encode_option(&mut b, OPT_STRUCTURED_REPLY, &[]);
        let mut q = BytesMut::new();
        q.put_u32(name.len() as u32);
        q.put_slice(name);
        q.put_u32(1);
        q.put_u32(META_BASE_ALLOCATION.len() as u32);
        q.put_slice(META_BASE_ALLOCATION.as_bytes());
        encode_option(&mut b, OPT_SET_META_CONTEXT, &q);
    }
    if mode == 3 {
        encode_option(&mut b, OPT_EXPORT_NAME, name);
    } else {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name);
        d.put_u16(0);
        encode_option(&mut b, OPT_GO, &d);
    }
    b.to_vec()
}
