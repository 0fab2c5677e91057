use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// A client frame: masked, as RFC 6455 requires of clients.
fn client_frame(opcode: OpCode, is_final: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let header = FrameHeader {
        is_final,
        opcode,
        mask: Some(mask),
        ..FrameHeader::default()
    };
    let mut out = Vec::new();
    header
        .format(u64::try_from(payload.len()).expect("fits"), &mut out)
        .expect("header");
    let mut masked = payload.to_vec();
    unmask(&mut masked, mask, 0);
    out.extend(masked);
    out
}

/// The server frames in `bytes`: (opcode, payload).
fn server_frames(mut bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let mut cursor = Cursor::new(bytes);
        let (header, length) = FrameHeader::parse(&mut cursor)
            .expect("valid")
            .expect("whole");
        assert!(header.mask.is_none(), "server frames are not masked");
        let start = usize::try_from(cursor.position()).expect("fits");
        let end = start + usize::try_from(length).expect("fits");
        frames.push((header.opcode, bytes[start..end].to_vec()));
        bytes = &bytes[end..];
    }
    frames
}

const BINARY: OpCode = OpCode::Data(Data::Binary);

#[tokio::test]
async fn payloads_arrive_as_one_stream_whatever_the_framing_and_chunking() {
    let message: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut wire = client_frame(BINARY, false, &message[..7_000]);
    wire.extend(client_frame(OpCode::Control(Control::Ping), true, b"hi"));
    wire.extend(client_frame(
        OpCode::Data(Data::Continue),
        true,
        &message[7_000..],
    ));
    wire.extend(client_frame(OpCode::Data(Data::Text), true, b"tail"));
    for chunk in [1, 3, 1000, wire.len()] {
        let (client, server) = tokio::io::duplex(256);
        let mut stream = WsStream::new(server);
        let writer = {
            let wire = wire.clone();
            tokio::spawn(async move {
                let mut client = client;
                for piece in wire.chunks(chunk) {
                    client.write_all(piece).await.expect("write");
                }
                client
            })
        };
        let mut got = vec![0u8; message.len() + 4];
        stream.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..message.len()], &message[..], "chunk {chunk}");
        assert_eq!(&got[message.len()..], b"tail");
        // The ping was answered with a pong carrying its payload.
        stream.flush().await.expect("flush");
        let mut client = writer.await.expect("join");
        drop(stream);
        let mut sent = Vec::new();
        client.read_to_end(&mut sent).await.expect("read");
        assert_eq!(
            server_frames(&sent),
            [(OpCode::Control(Control::Pong), b"hi".to_vec())]
        );
    }
}

#[tokio::test]
async fn writes_become_binary_frames_of_bounded_size() {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let mut stream = WsStream::new(server);
    let payload = vec![7u8; MAX_FRAME * 2 + 10];
    stream.write_all(&payload).await.expect("write");
    stream.shutdown().await.expect("shutdown");
    drop(stream);
    let mut sent = Vec::new();
    client.read_to_end(&mut sent).await.expect("read");
    let frames = server_frames(&sent);
    let sizes: Vec<usize> = frames.iter().map(|(_, p)| p.len()).collect();
    assert_eq!(sizes, [MAX_FRAME, MAX_FRAME, 10, 2]);
    assert!(frames[..3].iter().all(|(op, _)| *op == BINARY));
    assert_eq!(
        frames[3],
        (
            OpCode::Control(Control::Close),
            1000u16.to_be_bytes().to_vec()
        )
    );
    assert_eq!(
        frames
            .iter()
            .take(3)
            .flat_map(|(_, p)| p.clone())
            .collect::<Vec<_>>(),
        payload
    );
}

#[tokio::test]
async fn close_ends_the_stream_and_is_echoed() {
    let (mut client, server) = tokio::io::duplex(4096);
    let mut stream = WsStream::new(server);
    client
        .write_all(&client_frame(
            OpCode::Control(Control::Close),
            true,
            &1001u16.to_be_bytes(),
        ))
        .await
        .expect("write");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.expect("read");
    assert!(rest.is_empty());
    stream.shutdown().await.expect("shutdown");
    drop(stream);
    let mut sent = Vec::new();
    client.read_to_end(&mut sent).await.expect("read");
    assert_eq!(
        server_frames(&sent),
        [(
            OpCode::Control(Control::Close),
            1001u16.to_be_bytes().to_vec()
        )]
    );
}

#[tokio::test]
async fn a_huge_announced_frame_costs_no_memory_and_bad_frames_are_refused() {
    // A client announcing a 1 GiB frame gets its bytes streamed; nothing is
    // held for the rest of the frame.
    let (mut client, server) = tokio::io::duplex(4096);
    let mut stream = WsStream::new(server);
    let mut header = Vec::new();
    FrameHeader {
        opcode: BINARY,
        mask: Some([0; 4]),
        ..FrameHeader::default()
    }
    .format(1 << 30, &mut header)
    .expect("header");
    header.extend_from_slice(b"Qabc");
    client.write_all(&header).await.expect("write");
    let mut got = [0u8; 4];
    stream.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"Qabc");
    assert!(stream.buf.len() <= READ_BUFFER);

    for bad in [
        // Unmasked.
        vec![0x82, 0x01, b'x'],
        // A reserved bit without an extension.
        {
            let mut frame = client_frame(BINARY, true, b"x");
            frame[0] |= 0x40;
            frame
        },
        // A control frame over 125 bytes.
        client_frame(OpCode::Control(Control::Ping), true, &[0u8; 126]),
    ] {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut stream = WsStream::new(server);
        client.write_all(&bad).await.expect("write");
        let mut byte = [0u8; 1];
        assert!(stream.read(&mut byte).await.is_err(), "{bad:?}");
    }
}

/// Issue 21: pongs were sent only when the session wrote, so an idle
/// session never answered.
#[tokio::test]
async fn a_session_that_only_reads_answers_pings() {
    let (mut client, server) = tokio::io::duplex(4096);
    let mut stream = WsStream::new(server);
    let reader = tokio::spawn(async move {
        let mut byte = [0u8; 1];
        let _ = stream.read(&mut byte).await;
    });
    client
        .write_all(&client_frame(
            OpCode::Control(Control::Ping),
            true,
            b"are you there",
        ))
        .await
        .expect("write");
    let mut answer = [0u8; 15];
    tokio::time::timeout(
        std::time::Duration::from_secs(1),
        client.read_exact(&mut answer),
    )
    .await
    .expect("answered within a second")
    .expect("read");
    assert_eq!(
        server_frames(&answer),
        [(OpCode::Control(Control::Pong), b"are you there".to_vec())]
    );
    reader.abort();
}

/// Issue 21: every ping queued a pong until the session wrote, so a client
/// that pings and never reads grew the proxy's memory at will.
#[tokio::test]
async fn pings_never_read_leave_at_most_one_pong_waiting() {
    let (mut client, server) = tokio::io::duplex(256);
    let mut stream = WsStream::new(server);
    let ping = client_frame(OpCode::Control(Control::Ping), true, &[7u8; 125]);
    let mut writer = tokio::spawn(async move {
        for _ in 0..10_000 {
            client.write_all(&ping).await.expect("write");
        }
        client
    });
    let mut byte = [0u8; 1];
    let _client = tokio::select! {
        read = stream.read(&mut byte) => panic!("pings are not data: {read:?}"),
        written = &mut writer => written.expect("join"),
    };
    let waiting = stream.control.len() + stream.pong.as_ref().map_or(0, Vec::len);
    assert!(waiting <= 2 * (2 + 125), "{waiting} bytes of pongs waiting");
}

#[test]
fn the_accept_key_of_the_rfc_example() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}
