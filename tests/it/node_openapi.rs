//! Conformance: the client's routes and the simulator's answers follow `openapi/node-api.json`.

use node_api::schema::{check, operation, resolve};
use serde_json::Value;
use vpnbot::node::{wire, NodeUser, Operation};
use vpnbot_sim::node::{Fault, SimNode, SimNodeOptions};

fn doc() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/openapi/node-api.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn client_routes_and_key_header_match_the_document() {
    let doc = doc();
    for op in Operation::ALL {
        assert_eq!(
            operation(&doc, op)["operationId"],
            op.operation_id(),
            "{op}"
        );
    }
    // Nothing in the document that the client does not implement.
    let mut ids = Vec::new();
    for (_, item) in doc["paths"].as_object().unwrap() {
        for (m, o) in item.as_object().unwrap() {
            if m != "parameters" {
                ids.push(o["operationId"].as_str().unwrap().to_owned());
            }
        }
    }
    ids.sort();
    let mut ours: Vec<_> = Operation::ALL
        .iter()
        .map(|o| o.operation_id().to_owned())
        .collect();
    ours.sort();
    assert_eq!(ids, ours);
    let scheme = &doc["components"]["securitySchemes"]["apiKey"];
    assert_eq!(scheme["in"], "header");
    assert!(scheme["name"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case(wire::API_KEY_HEADER));
    // The body the client sends validates against the request schema.
    let body = serde_json::to_value(wire::UserBody {
        uuid: uuid::Uuid::new_v4(),
        email: vpnbot::node::owned_email(uuid::Uuid::new_v4()),
    })
    .unwrap();
    for op in [Operation::AddUser, Operation::UpdateUser] {
        let schema = &operation(&doc, op)["requestBody"]["content"]["application/json"]["schema"];
        let mut errs = Vec::new();
        check(&doc, schema, &body, "request", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
    }
}

#[test]
fn validator_rejects_what_the_contract_forbids() {
    let doc = doc();
    let list = &operation(&doc, Operation::ListUsers)["responses"]["200"]["content"]
        ["application/json"]["schema"];
    for bad in [
        serde_json::json!({"users": [["not-a-uuid", "x"]]}),
        serde_json::json!({"users": [[uuid::Uuid::nil().to_string()]]}),
        serde_json::json!({"items": []}),
    ] {
        let mut errs = Vec::new();
        check(&doc, list, &bad, "body", &mut errs);
        assert!(!errs.is_empty(), "{bad} should not validate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_answers_follow_the_document() {
    let doc = doc();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = SimNode::start(
        listener,
        SimNodeOptions {
            users: 20,
            owned_share: 0.5,
            ..Default::default()
        },
    );
    let base = format!("http://{}", sim.addr());
    let http = reqwest::Client::new();
    let mine = NodeUser::owned(uuid::Uuid::new_v4());
    let other = NodeUser {
        email: "changed".into(),
        ..mine.clone()
    };
    let absent = uuid::Uuid::new_v4();
    let body = |u: &NodeUser| {
        serde_json::to_vec(&wire::UserBody {
            uuid: u.uuid,
            email: u.email.clone(),
        })
        .unwrap()
    };
    type Case = (Operation, String, Option<Vec<u8>>, &'static str, u16);
    let users = format!("{base}{}", wire::USERS_PATH);
    let cases: Vec<Case> = vec![
        (
            Operation::Health,
            format!("{base}{}", wire::HEALTH_PATH),
            None,
            "sim-key",
            200,
        ),
        (Operation::ListUsers, users.clone(), None, "sim-key", 200),
        (
            Operation::AddUser,
            users.clone(),
            Some(body(&mine)),
            "sim-key",
            200,
        ),
        (
            Operation::AddUser,
            users.clone(),
            Some(body(&mine)),
            "sim-key",
            200,
        ),
        (
            Operation::AddUser,
            users.clone(),
            Some(body(&other)),
            "sim-key",
            409,
        ),
        (
            Operation::UpdateUser,
            format!("{users}/{}", mine.uuid),
            Some(body(&other)),
            "sim-key",
            200,
        ),
        (
            Operation::UpdateUser,
            format!("{users}/{absent}"),
            Some(body(&NodeUser::owned(absent))),
            "sim-key",
            404,
        ),
        (
            Operation::RemoveUser,
            format!("{users}/{}", mine.uuid),
            None,
            "sim-key",
            200,
        ),
        (
            Operation::RemoveUser,
            format!("{users}/{}", mine.uuid),
            None,
            "sim-key",
            200,
        ),
        (Operation::ListUsers, users.clone(), None, "wrong-key", 401),
    ];
    let mut checked = 0;
    let mut run = async |op: Operation, url: &str, b: Option<Vec<u8>>, key: &str, want: u16| {
        let method = reqwest::Method::from_bytes(wire::method(op).as_bytes()).unwrap();
        let mut req = http.request(method, url).header(wire::API_KEY_HEADER, key);
        if let Some(b) = b {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        assert_eq!(status, want, "{op} {url}");
        let declared = &operation(&doc, op)["responses"][status.to_string()];
        assert!(!declared.is_null(), "{op}: status {status} not declared");
        let declared = resolve(&doc, declared);
        for (h, spec) in declared
            .get("headers")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if spec["required"] == true {
                assert!(
                    resp.headers().contains_key(h.as_str()),
                    "{op} {status}: header {h} missing"
                );
            }
        }
        let value: Value = resp.json().await.unwrap();
        let schema = &declared["content"]["application/json"]["schema"];
        let mut errs = Vec::new();
        check(&doc, schema, &value, "body", &mut errs);
        assert!(errs.is_empty(), "{op} {status}: {errs:?}");
        checked += 1;
    };
    for (op, url, b, key, want) in cases {
        run(op, &url, b, key, want).await;
    }
    // Declared failure answers, produced by the fault modes.
    sim.set_fault(Operation::Health, Fault::RateLimited(2));
    run(
        Operation::Health,
        &format!("{base}{}", wire::HEALTH_PATH),
        None,
        "sim-key",
        429,
    )
    .await;
    sim.set_fault(Operation::Health, Fault::Status(503));
    run(
        Operation::Health,
        &format!("{base}{}", wire::HEALTH_PATH),
        None,
        "sim-key",
        503,
    )
    .await;
    assert_eq!(checked, 12);
}
