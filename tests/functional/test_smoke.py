from tests.helpers import decode_link, independent_decrypt, minimal_bundle


def test_create_and_resolve(client):
    r = client.post("/api/links", json={"files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}]})
    assert r.status_code == 201, r.json
    link = decode_link(r.json["shlink"])
    m = client.post(link["url"].replace("http://localhost", ""), json={"recipient": "Dr A", "embeddedLengthMax": 100000})
    assert m.status_code == 200, m.json
    header, body = independent_decrypt(m.json["files"][0]["embedded"], link["key"])
    assert b"Metformin" in body
