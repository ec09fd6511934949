//! The namespace helpers themselves: two test hosts joined by a veth pair
//! carry a real TCP connection, and nothing is left after the drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use ipcluster_tests::netns::{NetNs, veth};

#[test]
fn two_hosts_on_a_veth_pair_talk_and_vanish() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (client_path, server_path);
    {
        let client = NetNs::new("client");
        let server = NetNs::new("server");
        veth(&client, "c0", &server, "s0");
        client.ip(&["addr", "add", "10.201.0.1/24", "dev", "c0"]);
        server.ip(&["addr", "add", "10.201.0.2/24", "dev", "s0"]);
        client_path = client.path();
        server_path = server.path();

        let listener = server.run(|| TcpListener::bind("10.201.0.2:7000").expect("bind"));
        let accept = std::thread::spawn(move || {
            let (mut conn, peer) = listener.accept().expect("accept");
            conn.write_all(peer.ip().to_string().as_bytes())
                .expect("write");
        });
        let seen = client.run(|| {
            let mut conn = TcpStream::connect("10.201.0.2:7000").expect("connect");
            let mut seen = String::new();
            conn.read_to_string(&mut seen).expect("read");
            seen
        });
        accept.join().expect("server thread");
        assert_eq!(
            seen, "10.201.0.1",
            "the server saw the client's own address"
        );
    }
    assert!(
        !Path::new(&client_path).exists(),
        "{client_path:?} left behind"
    );
    assert!(
        !Path::new(&server_path).exists(),
        "{server_path:?} left behind"
    );
}
