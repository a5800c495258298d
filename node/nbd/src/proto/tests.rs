use proptest::prelude::*;

use super::*;

// ----- client-side helpers -----

fn flags_bytes(flags: u32) -> Vec<u8> {
    flags.to_be_bytes().to_vec()
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_option(&mut b, option, data);
    b.to_vec()
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(name.len() as u32);
    b.put_slice(name.as_bytes());
    b.put_u16(requests.len() as u16);
    for r in requests {
        b.put_u16(*r);
    }
    b.to_vec()
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(name.len() as u32);
    b.put_slice(name.as_bytes());
    b.put_u32(queries.len() as u32);
    for q in queries {
        b.put_u32(q.len() as u32);
        b.put_slice(q.as_bytes());
    }
    b.to_vec()
}

fn req(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
}

fn req_bytes(h: RequestHeader, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_request(&mut b, &h, payload);
    b.to_vec()
}

#[derive(Debug, PartialEq, Eq)]
struct OptReply {
    option: u32,
    ty: u32,
    data: Vec<u8>,
}

/// Parse a run of option replies (panics on anything else).
fn parse_replies(mut b: &[u8]) -> Vec<OptReply> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= OPTION_REPLY_HEADER_LEN, "truncated option reply");
        assert_eq!(b.get_u64(), OPTION_REPLY_MAGIC);
        let option = b.get_u32();
        let ty = b.get_u32();
        let len = b.get_u32() as usize;
        out.push(OptReply {
            option,
            ty,
            data: b[..len].to_vec(),
        });
        b.advance(len);
    }
    out
}

fn types(replies: &[OptReply]) -> Vec<u32> {
    replies.iter().map(|r| r.ty).collect()
}

/// A connection past the client flags.
fn start() -> ServerProto {
    let mut p = ServerProto::new(ProtoConfig::default());
    let greeting = p.take_output();
    assert_eq!(greeting.len(), GREETING_LEN);
    p.feed(&flags_bytes(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
    assert_eq!(p.poll(), Ok(None));
    p
}

fn send_opt(p: &mut ServerProto, option: u32, data: &[u8]) -> Option<Event> {
    p.feed(&opt(option, data));
    p.poll().expect("option accepted")
}

fn negotiate_structured(p: &mut ServerProto) {
    assert_eq!(send_opt(p, OPT_STRUCTURED_REPLY, &[]), None);
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_ACK]);
}

fn go(p: &mut ServerProto, name: &str, info: ExportInfo) -> Vec<OptReply> {
    let ev = send_opt(p, OPT_GO, &info_data(name, &[]));
    assert_eq!(
        ev,
        Some(Event::ExportQuery {
            name: name.to_owned(),
            kind: QueryKind::Go
        })
    );
    assert_eq!(p.answer_export(Ok(info)), Ok(Answer::Transmission));
    parse_replies(&p.take_output())
}

fn transmission(structured: bool, meta: bool, info: ExportInfo) -> ServerProto {
    let mut p = start();
    if structured {
        negotiate_structured(&mut p);
    }
    if meta {
        send_opt(
            &mut p,
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        );
        p.take_output();
    }
    go(&mut p, "disk", info);
    assert!(p.in_transmission());
    p
}

fn ro_info(size: u64) -> ExportInfo {
    ExportInfo {
        read_only: true,
        ..ExportInfo::new(size)
    }
}

/// Parse one simple reply: (error, cookie).
fn simple_reply(b: &[u8]) -> (u32, u64) {
    let mut b = b;
    assert_eq!(b.len(), SIMPLE_REPLY_HEADER_LEN, "one simple reply");
    assert_eq!(b.get_u32(), SIMPLE_REPLY_MAGIC);
    (b.get_u32(), b.get_u64())
}

/// Parse one structured chunk: (flags, type, cookie, payload).
fn chunk(b: &[u8]) -> (u16, u16, u64, Vec<u8>) {
    let mut b = b;
    assert_eq!(b.get_u32(), STRUCTURED_REPLY_MAGIC);
    let flags = b.get_u16();
    let ty = b.get_u16();
    let cookie = b.get_u64();
    let len = b.get_u32() as usize;
    assert_eq!(b.len(), len, "one chunk");
    (flags, ty, cookie, b.to_vec())
}

// ----- handshake -----

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let mut p = ServerProto::new(ProtoConfig::default());
    let g = p.take_output();
    let mut b = &g[..];
    assert_eq!(b.get_u64(), NBDMAGIC);
    assert_eq!(b.get_u64(), IHAVEOPT);
    assert_eq!(b.get_u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    assert!(b.is_empty());
    assert_eq!(p.read_hint(), 4);
}

#[test]
fn unknown_client_flags_close() {
    let mut p = ServerProto::new(ProtoConfig::default());
    p.feed(&flags_bytes(0x10 | FLAG_C_FIXED_NEWSTYLE));
    assert_eq!(p.poll(), Err(ProtoError::UnknownClientFlags(0x11)));
    assert!(p.is_closed());
    assert_eq!(p.poll(), Ok(None));
}

#[test]
fn bad_option_magic_closes() {
    let mut p = start();
    let mut bad = opt(OPT_LIST, &[]);
    bad[0] ^= 0xff;
    p.feed(&bad);
    assert!(matches!(p.poll(), Err(ProtoError::BadOptionMagic(_))));
    assert!(p.is_closed());
}

#[test]
fn unknown_option_is_unsup_and_negotiation_continues() {
    let mut p = start();
    assert_eq!(send_opt(&mut p, 1000, b"some data"), None);
    assert_eq!(send_opt(&mut p, OPT_EXTENDED_HEADERS, &[]), None);
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_ERR_UNSUP, REP_ERR_UNSUP]);
    assert_eq!(r[0].option, 1000);
    assert!(!r[0].data.is_empty(), "error replies carry a message");
    assert_eq!(send_opt(&mut p, OPT_LIST, &[]), Some(Event::ListExports));
}

#[test]
fn export_name_enters_transmission_with_or_without_zeroes() {
    for (client_flags, zeroes) in [
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut p = ServerProto::new(ProtoConfig::default());
        p.take_output();
        p.feed(&flags_bytes(client_flags));
        p.feed(&opt(OPT_EXPORT_NAME, b"disk"));
        assert_eq!(
            p.poll(),
            Ok(Some(Event::ExportQuery {
                name: "disk".into(),
                kind: QueryKind::ExportName
            }))
        );
        assert!(p.awaiting_answer());
        assert_eq!(
            p.answer_export(Ok(ExportInfo::new(12345))),
            Ok(Answer::Transmission)
        );
        let out = p.take_output();
        assert_eq!(out.len(), 10 + zeroes);
        let mut b = &out[..];
        assert_eq!(b.get_u64(), 12345);
        assert_eq!(
            b.get_u16(),
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_CACHE
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
        );
        assert!(b.iter().all(|&x| x == 0));
        assert!(p.in_transmission());
        assert_eq!(p.read_hint(), REQUEST_HEADER_LEN);
    }
}

#[test]
fn export_name_refused_or_invalid_closes() {
    let mut p = start();
    p.feed(&opt(OPT_EXPORT_NAME, b"nope"));
    assert!(matches!(p.poll(), Ok(Some(Event::ExportQuery { .. }))));
    assert_eq!(
        p.answer_export(Err(Refusal::Unknown("x".into()))),
        Err(ProtoError::ExportRefused("nope".into()))
    );
    assert!(p.is_closed());

    let mut p = start();
    p.feed(&opt(OPT_EXPORT_NAME, &vec![b'a'; MAX_STRING_LEN + 1]));
    assert_eq!(p.poll(), Err(ProtoError::BadExportName));

    let mut p = start();
    p.feed(&opt(OPT_EXPORT_NAME, b"a\0b"));
    assert_eq!(p.poll(), Err(ProtoError::BadExportName));

    let mut p = start();
    p.feed(&opt(OPT_EXPORT_NAME, &[0xff, 0xfe]));
    assert_eq!(p.poll(), Err(ProtoError::BadExportName));
}

#[test]
fn abort_acks_and_closes() {
    let mut p = start();
    p.feed(&opt(OPT_ABORT, &[]));
    p.feed(b"trailing garbage");
    assert_eq!(p.poll(), Ok(Some(Event::Abort)));
    assert!(p.is_closed());
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_ACK]);
    assert_eq!(r[0].option, OPT_ABORT);
    assert_eq!(p.poll(), Ok(None));
}

#[test]
fn list_exports() {
    let mut p = start();
    assert_eq!(send_opt(&mut p, OPT_LIST, b"x"), None);
    assert_eq!(
        types(&parse_replies(&p.take_output())),
        vec![REP_ERR_INVALID]
    );

    assert_eq!(send_opt(&mut p, OPT_LIST, &[]), Some(Event::ListExports));
    assert_eq!(p.read_hint(), 0);
    let long = "x".repeat(MAX_STRING_LEN + 1);
    p.answer_list(&["a", "bee", long.as_str()]);
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_SERVER, REP_SERVER, REP_ACK]);
    assert_eq!(r[0].data, [&1u32.to_be_bytes()[..], b"a"].concat());
    assert_eq!(r[1].data, [&3u32.to_be_bytes()[..], b"bee"].concat());
}

#[test]
fn starttls_is_refused_by_policy() {
    let mut p = start();
    assert_eq!(send_opt(&mut p, OPT_STARTTLS, &[]), None);
    assert_eq!(send_opt(&mut p, OPT_STARTTLS, b"junk"), None);
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_ERR_POLICY, REP_ERR_INVALID]);
}

#[test]
fn info_describes_without_entering_transmission() {
    let mut p = start();
    let ev = send_opt(
        &mut p,
        OPT_INFO,
        &info_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    assert_eq!(
        ev,
        Some(Event::ExportQuery {
            name: "disk".into(),
            kind: QueryKind::Info
        })
    );
    let info = ExportInfo {
        description: Some("a test disk".into()),
        multi_conn: true,
        ..ro_info(1 << 20)
    };
    assert_eq!(p.answer_export(Ok(info)), Ok(Answer::Negotiating));
    let r = parse_replies(&p.take_output());
    assert_eq!(
        types(&r),
        vec![REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]
    );
    let mut export = &r[0].data[..];
    assert_eq!(export.len(), 12);
    assert_eq!(export.get_u16(), INFO_EXPORT);
    assert_eq!(export.get_u64(), 1 << 20);
    let flags = export.get_u16();
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS
            | FLAG_READ_ONLY
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN
    );
    assert_eq!(r[1].data, [&INFO_NAME.to_be_bytes()[..], b"disk"].concat());
    assert_eq!(
        r[2].data,
        [&INFO_DESCRIPTION.to_be_bytes()[..], b"a test disk"].concat()
    );
    let mut bs = &r[3].data[..];
    assert_eq!(bs.len(), 14);
    assert_eq!(bs.get_u16(), INFO_BLOCK_SIZE);
    assert_eq!(
        (bs.get_u32(), bs.get_u32(), bs.get_u32()),
        (1, 4096, DEFAULT_MAX_REQUEST_LEN)
    );
    assert!(!p.in_transmission());
    // Still negotiating: GO works afterwards.
    go(&mut p, "disk", ExportInfo::new(1 << 20));
    assert!(p.in_transmission());
}

#[test]
fn info_unknown_export_then_go_succeeds() {
    let mut p = start();
    send_opt(&mut p, OPT_INFO, &info_data("missing", &[]));
    assert_eq!(
        p.answer_export(Err(Refusal::Unknown("no such export".into()))),
        Ok(Answer::Negotiating)
    );
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_ERR_UNKNOWN]);
    assert_eq!(r[0].data, b"no such export");

    send_opt(&mut p, OPT_GO, &info_data("x", &[]));
    assert_eq!(
        p.answer_export(Err(Refusal::Policy("denied".into()))),
        Ok(Answer::Negotiating)
    );
    send_opt(&mut p, OPT_GO, &info_data("x", &[]));
    assert_eq!(
        p.answer_export(Err(Refusal::Shutdown)),
        Ok(Answer::Negotiating)
    );
    assert_eq!(
        types(&parse_replies(&p.take_output())),
        vec![REP_ERR_POLICY, REP_ERR_SHUTDOWN]
    );
    let r = go(&mut p, "disk", ExportInfo::new(4096));
    assert_eq!(types(&r), vec![REP_INFO, REP_INFO, REP_ACK]);
}

#[test]
fn malformed_info_and_go_are_invalid() {
    let mut too_long_name = info_data("disk", &[]);
    too_long_name[3] = 200;
    let mut bad_count = info_data("disk", &[INFO_NAME]);
    bad_count.push(0);
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0, 0, 0],
        too_long_name,
        bad_count,
        info_data("a\0b", &[]),
        info_data(&"n".repeat(MAX_STRING_LEN + 1), &[]),
        {
            let mut d = info_data("disk", &[]);
            d.truncate(d.len() - 1);
            d
        },
    ];
    for option in [OPT_INFO, OPT_GO] {
        let mut p = start();
        for data in &cases {
            assert_eq!(send_opt(&mut p, option, data), None, "{data:?}");
        }
        let r = parse_replies(&p.take_output());
        assert_eq!(types(&r), vec![REP_ERR_INVALID; cases.len()]);
        assert!(!p.in_transmission());
    }
}

#[test]
fn structured_reply_negotiation() {
    let mut p = start();
    assert_eq!(send_opt(&mut p, OPT_STRUCTURED_REPLY, b"x"), None);
    assert_eq!(
        types(&parse_replies(&p.take_output())),
        vec![REP_ERR_INVALID]
    );
    assert!(!p.structured_replies());
    negotiate_structured(&mut p);
    assert!(p.structured_replies());
}

#[test]
fn meta_context_needs_structured_replies() {
    let mut p = start();
    send_opt(&mut p, OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
    send_opt(
        &mut p,
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(
        types(&parse_replies(&p.take_output())),
        vec![REP_ERR_INVALID, REP_ERR_INVALID]
    );
    go(&mut p, "disk", ExportInfo::new(4096));
    assert_eq!(p.allocation_context(), None);
}

#[test]
fn list_meta_context_queries() {
    let mut p = start();
    negotiate_structured(&mut p);
    let ctx_reply = [&0u32.to_be_bytes()[..], META_BASE_ALLOCATION.as_bytes()].concat();
    for (queries, listed) in [
        (vec![], true),
        (vec!["base:"], true),
        (vec!["base:allocation"], true),
        (vec!["x-other:thing"], false),
        (vec!["qemu:dirty-bitmap:x", "base:allocation"], true),
    ] {
        send_opt(&mut p, OPT_LIST_META_CONTEXT, &meta_data("disk", &queries));
        let r = parse_replies(&p.take_output());
        if listed {
            assert_eq!(types(&r), vec![REP_META_CONTEXT, REP_ACK], "{queries:?}");
            assert_eq!(r[0].data, ctx_reply);
        } else {
            assert_eq!(types(&r), vec![REP_ACK], "{queries:?}");
        }
    }
}

#[test]
fn set_meta_context_selects_for_the_named_export() {
    for (set_name, go_name, expect) in [
        ("disk", "disk", Some(ALLOCATION_CONTEXT_ID)),
        ("other", "disk", None),
    ] {
        let mut p = start();
        negotiate_structured(&mut p);
        send_opt(
            &mut p,
            OPT_SET_META_CONTEXT,
            &meta_data(set_name, &["base:allocation", "base:"]),
        );
        let r = parse_replies(&p.take_output());
        assert_eq!(types(&r), vec![REP_META_CONTEXT, REP_ACK]);
        assert_eq!(
            r[0].data,
            [
                &ALLOCATION_CONTEXT_ID.to_be_bytes()[..],
                META_BASE_ALLOCATION.as_bytes()
            ]
            .concat()
        );
        go(&mut p, go_name, ExportInfo::new(4096));
        assert_eq!(p.allocation_context(), expect);
    }
}

#[test]
fn set_meta_context_is_replaced_even_on_failure() {
    let mut p = start();
    negotiate_structured(&mut p);
    send_opt(
        &mut p,
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    let mut bad = meta_data("disk", &["base:allocation"]);
    bad.push(7); // trailing byte
    send_opt(&mut p, OPT_SET_META_CONTEXT, &bad);
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_META_CONTEXT, REP_ACK, REP_ERR_INVALID]);
    go(&mut p, "disk", ExportInfo::new(4096));
    assert_eq!(p.allocation_context(), None);

    // Zero queries select nothing.
    let mut p = start();
    negotiate_structured(&mut p);
    send_opt(&mut p, OPT_SET_META_CONTEXT, &meta_data("disk", &[]));
    assert_eq!(types(&parse_replies(&p.take_output())), vec![REP_ACK]);
    go(&mut p, "disk", ExportInfo::new(4096));
    assert_eq!(p.allocation_context(), None);
}

#[test]
fn malformed_meta_context_is_invalid() {
    let mut huge_count = meta_data("disk", &[]);
    let n = huge_count.len();
    huge_count[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    let cases = vec![
        vec![],
        vec![0, 0, 0, 9, b'a'],
        meta_data("disk", &[])[..8].to_vec(),
        huge_count,
        meta_data("disk", &["bad\0query"]),
    ];
    let mut p = start();
    negotiate_structured(&mut p);
    for data in &cases {
        send_opt(&mut p, OPT_LIST_META_CONTEXT, data);
    }
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_ERR_INVALID; cases.len()]);
}

#[test]
fn oversize_option_is_skipped_with_too_big() {
    let mut p = start();
    let len = DEFAULT_MAX_OPTION_LEN as usize + 1;
    let data = vec![0x55u8; len];
    p.feed(&opt(OPT_GO, &data)[..OPTION_HEADER_LEN + 10]);
    assert_eq!(p.poll(), Ok(None));
    // Skipping buffers nothing.
    assert!(p.input_mut().is_empty());
    assert!(p.read_hint() <= SKIP_READ_HINT);
    p.feed(&data[10..]);
    assert_eq!(p.poll(), Ok(None));
    let r = parse_replies(&p.take_output());
    assert_eq!(types(&r), vec![REP_ERR_TOO_BIG]);
    assert_eq!(r[0].option, OPT_GO);
    assert_eq!(send_opt(&mut p, OPT_LIST, &[]), Some(Event::ListExports));
}

#[test]
fn option_too_big_to_skip_closes() {
    let mut p = start();
    let mut hdr = BytesMut::new();
    hdr.put_u64(IHAVEOPT);
    hdr.put_u32(OPT_GO);
    hdr.put_u32(u32::MAX);
    p.feed(&hdr);
    assert_eq!(
        p.poll(),
        Err(ProtoError::OptionTooLarge {
            option: OPT_GO,
            len: u32::MAX
        })
    );
    assert_eq!(
        types(&parse_replies(&p.take_output())),
        vec![REP_ERR_TOO_BIG]
    );
    assert!(p.is_closed());
}

// ----- transmission -----

#[test]
fn valid_requests_decode() {
    let mut p = transmission(true, true, ExportInfo::new(1 << 20));
    let cases = [
        (req(CMD_READ, 0, 1, 0, 4096), Op::Read),
        (req(CMD_READ, CMD_FLAG_FUA, 2, (1 << 20) - 1, 1), Op::Read),
        (req(CMD_FLUSH, 0, 3, 0, 0), Op::Flush),
        (req(CMD_TRIM, CMD_FLAG_FUA, 4, 512, 512), Op::Trim),
        (req(CMD_CACHE, 0, 5, 0, 1 << 20), Op::Cache),
        (
            req(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                6,
                0,
                1 << 20,
            ),
            Op::WriteZeroes,
        ),
        (
            req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 7, 0, 1 << 20),
            Op::BlockStatus,
        ),
        (req(CMD_READ, 0, 8, 0, 0), Op::Read),
        (req(CMD_WRITE, 0, 9, 100, 0), Op::Write(Bytes::new())),
    ];
    for (h, op) in cases {
        p.feed(&req_bytes(h, &[]));
        let expect = Request {
            cookie: h.cookie,
            flags: h.flags,
            offset: h.offset,
            length: h.length,
            op,
        };
        assert_eq!(p.poll(), Ok(Some(Event::Request(expect))));
        assert!(p.output().is_empty());
    }
}

#[test]
fn write_payload_is_assembled_across_feeds() {
    let mut p = transmission(false, false, ExportInfo::new(1 << 20));
    let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let bytes = req_bytes(req(CMD_WRITE, CMD_FLAG_FUA, 42, 4096, 10_000), &payload);
    p.feed(&bytes[..30]);
    assert_eq!(p.poll(), Ok(None));
    assert_eq!(p.read_hint(), 10_000 - 2);
    p.feed(&bytes[30..]);
    let Ok(Some(Event::Request(r))) = p.poll() else {
        panic!("expected a write");
    };
    assert!(r.fua());
    assert_eq!(r.op, Op::Write(Bytes::from(payload)));
    assert_eq!(p.poll(), Ok(None));
}

fn expect_rejected(p: &mut ServerProto, h: RequestHeader, payload: &[u8], errno: Errno) {
    p.feed(&req_bytes(h, payload));
    assert_eq!(
        p.poll(),
        Ok(Some(Event::Rejected {
            cookie: h.cookie,
            command: h.command,
            errno
        })),
        "{h:?}"
    );
    let out = p.take_output();
    if p.structured_replies() {
        let (flags, ty, cookie, payload) = chunk(&out);
        assert_eq!(
            (flags, ty, cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h.cookie)
        );
        let mut b = &payload[..];
        assert_eq!(b.get_u32(), errno.code());
        let msg_len = b.get_u16() as usize;
        assert_eq!(b.len(), msg_len);
        assert!(msg_len > 0);
    } else {
        assert_eq!(simple_reply(&out), (errno.code(), h.cookie));
    }
    // The connection goes on: a valid read still decodes.
    p.feed(&req_bytes(req(CMD_READ, 0, 999, 0, 1), &[]));
    assert!(matches!(p.poll(), Ok(Some(Event::Request(_)))));
}

#[test]
fn invalid_requests_get_the_protocol_errno() {
    for structured in [false, true] {
        let size = 1 << 20;
        let mut p = transmission(structured, false, ExportInfo::new(size));
        let max = DEFAULT_MAX_REQUEST_LEN;
        expect_rejected(&mut p, req(CMD_READ, 0, 1, size, 1), &[], Errno::Inval);
        expect_rejected(&mut p, req(CMD_READ, 0, 2, u64::MAX, 2), &[], Errno::Inval);
        expect_rejected(&mut p, req(CMD_READ, 0, 3, 0, max + 1), &[], Errno::Inval);
        expect_rejected(
            &mut p,
            req(CMD_READ, CMD_FLAG_DF, 4, 0, 1),
            &[],
            Errno::Inval,
        );
        expect_rejected(
            &mut p,
            req(CMD_READ, CMD_FLAG_NO_HOLE, 5, 0, 1),
            &[],
            Errno::Inval,
        );
        expect_rejected(
            &mut p,
            req(CMD_WRITE, 0, 6, size - 1, 2),
            &[1, 2],
            Errno::NoSpc,
        );
        expect_rejected(
            &mut p,
            req(CMD_WRITE_ZEROES, 0, 7, size, 1),
            &[],
            Errno::NoSpc,
        );
        expect_rejected(
            &mut p,
            req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 8, 0, 1),
            &[],
            Errno::Inval,
        );
        expect_rejected(&mut p, req(CMD_TRIM, 0, 9, size, 1), &[], Errno::Inval);
        expect_rejected(&mut p, req(CMD_FLUSH, 0, 10, 1, 0), &[], Errno::Inval);
        expect_rejected(&mut p, req(CMD_CACHE, 0, 11, size, 1), &[], Errno::Inval);
        expect_rejected(&mut p, req(99, 0, 12, 0, 0), &[], Errno::Inval);
        // No metadata context negotiated.
        expect_rejected(
            &mut p,
            req(CMD_BLOCK_STATUS, 0, 13, 0, 1),
            &[],
            Errno::Inval,
        );
        // Oversize write: answered, payload skipped.
        let big = vec![7u8; max as usize + 1];
        expect_rejected(
            &mut p,
            req(CMD_WRITE, 0, 14, 0, max + 1),
            &big,
            Errno::Inval,
        );
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let mut p = transmission(true, false, ro_info(1 << 20));
    expect_rejected(&mut p, req(CMD_WRITE, 0, 1, 0, 3), &[1, 2, 3], Errno::Perm);
    expect_rejected(&mut p, req(CMD_TRIM, 0, 2, 0, 512), &[], Errno::Perm);
    expect_rejected(
        &mut p,
        req(CMD_WRITE_ZEROES, 0, 3, 0, 512),
        &[],
        Errno::Perm,
    );
}

#[test]
fn block_status_needs_a_selected_context() {
    let mut p = transmission(true, true, ExportInfo::new(4096));
    assert_eq!(p.allocation_context(), Some(ALLOCATION_CONTEXT_ID));
    expect_rejected(&mut p, req(CMD_BLOCK_STATUS, 0, 1, 0, 0), &[], Errno::Inval);
    expect_rejected(
        &mut p,
        req(CMD_BLOCK_STATUS, 0, 2, 4000, 100),
        &[],
        Errno::Inval,
    );
    p.feed(&req_bytes(req(CMD_BLOCK_STATUS, 0, 3, 0, 4096), &[]));
    assert!(matches!(
        p.poll(),
        Ok(Some(Event::Request(Request {
            op: Op::BlockStatus,
            ..
        })))
    ));
}

#[test]
fn write_too_big_to_skip_closes_after_replying() {
    let mut p = transmission(false, false, ExportInfo::new(u64::MAX));
    p.feed(&req_bytes(req(CMD_WRITE, 0, 5, 0, u32::MAX), &[]));
    assert_eq!(p.poll(), Err(ProtoError::PayloadTooLarge(u32::MAX)));
    assert_eq!(simple_reply(&p.take_output()), (Errno::Inval.code(), 5));
    assert!(p.is_closed());
}

#[test]
fn bad_request_magic_closes() {
    let mut p = transmission(false, false, ExportInfo::new(4096));
    let mut b = req_bytes(req(CMD_READ, 0, 1, 0, 1), &[]);
    b[3] ^= 1;
    p.feed(&b);
    assert!(matches!(p.poll(), Err(ProtoError::BadRequestMagic(_))));
    assert!(p.is_closed());
}

#[test]
fn disconnect_closes_and_ignores_the_rest() {
    let mut p = transmission(false, false, ExportInfo::new(4096));
    p.feed(&req_bytes(req(CMD_DISC, 0, 1, 0, 0), &[]));
    p.feed(&req_bytes(req(CMD_READ, 0, 2, 0, 1), &[]));
    assert_eq!(p.poll(), Ok(Some(Event::Disconnect)));
    assert!(p.is_closed());
    p.feed(b"more");
    assert_eq!(p.poll(), Ok(None));
    assert!(p.output().is_empty());
}

// ----- encoders -----

#[test]
fn read_reply_headers() {
    let mut b = BytesMut::new();
    encode_read_reply_header(&mut b, false, 7, 100, 50);
    assert_eq!(b.len(), read_reply_header_len(false, 50));
    assert_eq!(simple_reply(&b), (0, 7));

    let mut b = BytesMut::new();
    encode_read_reply_header(&mut b, true, 7, 100, 50);
    assert_eq!(b.len(), read_reply_header_len(true, 50));
    b.put_bytes(0xaa, 50);
    let (flags, ty, cookie, payload) = chunk(&b);
    assert_eq!(
        (flags, ty, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7)
    );
    assert_eq!(&payload[..8], &100u64.to_be_bytes());
    assert_eq!(payload.len(), 58);

    let mut b = BytesMut::new();
    encode_read_reply_header(&mut b, true, 7, 100, 0);
    assert_eq!(b.len(), read_reply_header_len(true, 0));
    assert_eq!(chunk(&b), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7, vec![]));
}

#[test]
fn error_and_status_replies() {
    let mut b = BytesMut::new();
    encode_error_reply(&mut b, true, 9, Errno::Io, "boom");
    let (flags, ty, cookie, payload) = chunk(&b);
    assert_eq!((flags, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9));
    assert_eq!(
        payload,
        [&5u32.to_be_bytes()[..], &4u16.to_be_bytes(), b"boom"].concat()
    );

    let mut b = BytesMut::new();
    encode_error_reply(&mut b, true, 9, Errno::Io, &"é".repeat(3000));
    let (_, _, _, payload) = chunk(&b);
    assert!(payload.len() <= 6 + MAX_STRING_LEN);
    assert!(std::str::from_utf8(&payload[6..]).is_ok());

    let mut b = BytesMut::new();
    encode_block_status_reply(&mut b, 3, 1, &[Extent::data(512), Extent::hole(1024)]);
    let (flags, ty, cookie, payload) = chunk(&b);
    assert_eq!(
        (flags, ty, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 3)
    );
    let mut p = &payload[..];
    assert_eq!(p.get_u32(), 1);
    assert_eq!((p.get_u32(), p.get_u32()), (512, 0));
    assert_eq!((p.get_u32(), p.get_u32()), (1024, STATE_HOLE | STATE_ZERO));

    let mut b = BytesMut::new();
    encode_offset_hole(&mut b, 4, 4096, 512, true);
    let (flags, ty, _, payload) = chunk(&b);
    assert_eq!((flags, ty), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE));
    assert_eq!(
        payload,
        [&4096u64.to_be_bytes()[..], &512u32.to_be_bytes()].concat()
    );
}

#[test]
fn extents_are_normalized() {
    assert_eq!(normalize_extents(&[], 100, false), vec![Extent::data(100)]);
    assert_eq!(
        normalize_extents(
            &[
                Extent::data(0),
                Extent::data(10),
                Extent::data(20),
                Extent::hole(500)
            ],
            100,
            false
        ),
        vec![Extent::data(30), Extent::hole(70)]
    );
    assert_eq!(
        normalize_extents(
            &[Extent::data(10), Extent::data(20), Extent::hole(5)],
            100,
            true
        ),
        vec![Extent::data(30)]
    );
    assert_eq!(
        normalize_extents(&[Extent::hole(1000)], 100, true),
        vec![Extent::hole(100)]
    );
    let many: Vec<Extent> = (0..20_000)
        .map(|i| {
            if i % 2 == 0 {
                Extent::data(1)
            } else {
                Extent::hole(1)
            }
        })
        .collect();
    let n = normalize_extents(&many, 20_000, false);
    assert_eq!(n.len(), MAX_EXTENTS);
    assert!(n.iter().map(|e| e.length).sum::<u32>() <= 20_000);
}

#[test]
fn errno_codes_round_trip() {
    for e in [
        Errno::Perm,
        Errno::Io,
        Errno::NoMem,
        Errno::Inval,
        Errno::NoSpc,
        Errno::Overflow,
        Errno::NotSup,
        Errno::Shutdown,
    ] {
        assert_eq!(Errno::from_code(e.code()), Some(e));
        assert!(e.name().starts_with('E'));
    }
    assert_eq!(Errno::from_code(0), None);
}

// ----- property tests -----

/// Drive a connection over `chunks`, answering events the same way every
/// time: returns the events, every output byte, and the error, if any.
fn drive(chunks: &[&[u8]]) -> (Vec<Event>, Vec<u8>, Option<ProtoError>) {
    let mut p = ServerProto::new(ProtoConfig {
        max_option_len: 256,
        max_request_len: 4096,
        max_skip_len: 8192,
    });
    let mut events = Vec::new();
    let mut out = p.take_output().to_vec();
    for c in chunks {
        p.feed(c);
        loop {
            let r = p.poll();
            out.extend_from_slice(&p.take_output());
            match r {
                Ok(Some(ev)) => {
                    if let Err(e) = answer(&mut p, &ev) {
                        out.extend_from_slice(&p.take_output());
                        events.push(ev);
                        return (events, out, Some(e));
                    }
                    out.extend_from_slice(&p.take_output());
                    events.push(ev);
                }
                Ok(None) => break,
                Err(e) => return (events, out, Some(e)),
            }
        }
    }
    (events, out, None)
}

fn answer(p: &mut ServerProto, ev: &Event) -> Result<(), ProtoError> {
    match ev {
        Event::ListExports => p.answer_list(&["disk", "ro"]),
        Event::ExportQuery { name, .. } => {
            let r = match name.as_str() {
                "disk" => Ok(ExportInfo::new(1 << 16)),
                "ro" => Ok(ro_info(1 << 16)),
                _ => Err(Refusal::Unknown("unknown".into())),
            };
            p.answer_export(r)?;
        }
        _ => {}
    }
    Ok(())
}

fn arb_option() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(opt(OPT_STRUCTURED_REPLY, &[])),
        Just(opt(OPT_LIST, &[])),
        Just(opt(OPT_STARTTLS, &[])),
        Just(opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"])
        )),
        Just(opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]))),
        Just(opt(
            OPT_INFO,
            &info_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE])
        )),
        Just(opt(OPT_INFO, &info_data("nope", &[]))),
        Just(opt(OPT_GO, &info_data("nope", &[]))),
        Just(opt(OPT_GO, &[1, 2, 3])),
        Just(opt(1234, b"unknown")),
        Just(opt(OPT_LIST, &[0u8; 300])),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(o, d)| opt(o % 16, &d)),
    ]
}

fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    (0u16..9, 0u16..32, any::<u64>(), 0u64..(1 << 17), 0u32..6000).prop_map(
        |(cmd, flags, cookie, offset, len)| {
            let cmd = if cmd == CMD_DISC { CMD_READ } else { cmd };
            let payload = if cmd == CMD_WRITE {
                vec![0xab; len as usize]
            } else {
                vec![]
            };
            req_bytes(req(cmd, flags, cookie, offset, len), &payload)
        },
    )
}

fn arb_session() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(arb_option(), 0..6),
        prop_oneof![Just("disk"), Just("ro")],
        any::<bool>(),
        proptest::collection::vec(arb_request(), 0..12),
    )
        .prop_map(|(opts, name, legacy, reqs)| {
            let mut b = flags_bytes(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            for o in opts {
                b.extend_from_slice(&o);
            }
            if legacy {
                b.extend_from_slice(&opt(OPT_EXPORT_NAME, name.as_bytes()));
            } else {
                b.extend_from_slice(&opt(OPT_GO, &info_data(name, &[])));
            }
            for r in reqs {
                b.extend_from_slice(&r);
            }
            b
        })
}

fn split_at_points<'a>(data: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = points.iter().map(|p| p % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut prev = 0;
    for c in cuts {
        chunks.push(&data[prev..c]);
        prev = c;
    }
    chunks.push(&data[prev..]);
    chunks
}

proptest! {
    #[test]
    fn request_header_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let h = req(command, flags, cookie, offset, length);
        let b = req_bytes(h, &[]);
        prop_assert_eq!(b.len(), REQUEST_HEADER_LEN);
        prop_assert_eq!(decode_request_header(&b), Ok(Some(h)));
        prop_assert_eq!(decode_request_header(&b[..REQUEST_HEADER_LEN - 1]), Ok(None));
    }

    #[test]
    fn valid_requests_round_trip_through_the_state_machine(
        reqs in proptest::collection::vec(
            (prop_oneof![Just(CMD_READ), Just(CMD_WRITE), Just(CMD_TRIM), Just(CMD_WRITE_ZEROES), Just(CMD_CACHE), Just(CMD_BLOCK_STATUS)],
             any::<bool>(), any::<u64>(), 0u64..65536, 1u32..4096),
            1..20),
    ) {
        let mut p = transmission(true, true, ExportInfo::new(1 << 20));
        for (cmd, fua, cookie, offset, len) in reqs {
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            let payload: Vec<u8> = if cmd == CMD_WRITE { (0..len).map(|i| i as u8).collect() } else { vec![] };
            p.feed(&req_bytes(req(cmd, flags, cookie, offset, len), &payload));
            let ev = p.poll().expect("valid");
            let Some(Event::Request(r)) = ev else { panic!("expected a request, got {ev:?}") };
            prop_assert_eq!(r.command(), cmd);
            prop_assert_eq!((r.cookie, r.offset, r.length, r.fua()), (cookie, offset, len, fua));
            if let Op::Write(data) = &r.op {
                prop_assert_eq!(&data[..], &payload[..]);
            }
            prop_assert!(p.output().is_empty());
        }
    }

    #[test]
    fn any_byte_split_gives_the_same_events(
        session in arb_session(),
        points in proptest::collection::vec(any::<usize>(), 0..24),
    ) {
        let whole = drive(&[&session]);
        let split = drive(&split_at_points(&session, &points));
        prop_assert_eq!(&whole, &split);
        let bytewise: Vec<&[u8]> = session.chunks(1).collect();
        prop_assert_eq!(&whole, &drive(&bytewise));
    }

    #[test]
    fn random_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = drive(&[&data]);
        // Also past a valid handshake, straight into transmission.
        let mut b = flags_bytes(FLAG_C_FIXED_NEWSTYLE);
        b.extend_from_slice(&opt(OPT_STRUCTURED_REPLY, &[]));
        b.extend_from_slice(&opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:allocation"])));
        b.extend_from_slice(&opt(OPT_GO, &info_data("disk", &[])));
        b.extend_from_slice(&data);
        let _ = drive(&[&b]);
    }

    #[test]
    fn truncated_or_bit_flipped_sessions_never_panic(
        session in arb_session(),
        cut in any::<usize>(),
        flips in proptest::collection::vec((any::<usize>(), 0u8..8), 0..8),
    ) {
        let mut s = session.clone();
        s.truncate(cut % (s.len() + 1));
        let _ = drive(&[&s]);
        let mut s = session;
        let n = s.len();
        for (i, bit) in flips {
            s[i % n] ^= 1 << bit;
        }
        let _ = drive(&[&s]);
    }
}
