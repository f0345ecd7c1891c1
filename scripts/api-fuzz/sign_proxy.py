"""A signing proxy for schemathesis: plain HTTP in, the same request out to Updraft over HTTPS, signed with
SDK-HMAC-SHA256 by Huawei's own signer (huaweicloudsdkcore), and sent to the credential's project (the
`{project_id}` of `/v5/iot/{project_id}/...` is replaced), so every generated request reaches the handlers
instead of stopping at the signature or project check. SIGN_PROXY_LOG=1 prints refused (401/403) requests.

Usage: python sign_proxy.py LISTEN_PORT UPSTREAM_BASE CA_FILE AK SK PROJECT_ID
"""

import http.server
import os
import sys
import urllib.parse

import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

PORT, UPSTREAM, CA, AK, SK, PROJECT = sys.argv[1:7]
UP = urllib.parse.urlsplit(UPSTREAM)
SIGNER = Signer(BasicCredentials(AK, SK))
SESSION = requests.Session()
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path.startswith("/v5/iot/"):
            rest = path[len("/v5/iot/"):].split("/", 1)
            path = "/v5/iot/" + PROJECT + ("/" + rest[1] if len(rest) > 1 else "")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {}
        for name in ("Content-Type", "Accept"):
            if self.headers.get(name):
                headers[name] = self.headers[name]
        req = SdkRequest(
            method=self.command,
            schema=UP.scheme,
            host=UP.netloc,
            resource_path=path,
            query_params=urllib.parse.parse_qsl(url.query, keep_blank_values=True),
            header_params=headers,
            body=body,
        )
        SIGNER.sign(req)
        resp = SESSION.request(
            self.command,
            f"{UPSTREAM}{req.uri}",
            headers=req.header_params,
            data=body or None,
            verify=CA,
            allow_redirects=False,
        )
        if os.environ.get("SIGN_PROXY_LOG") and resp.status_code in (401, 403):
            print(self.command, self.path, resp.status_code, resp.text[:200], file=sys.stderr)
        self.send_response(resp.status_code)
        for name, value in resp.headers.items():
            if name.lower() not in HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.content)

    def __getattr__(self, name):
        # Every method, also ones http.server has never heard of (schemathesis tries TRACE and QUERY).
        if name.startswith("do_"):
            return self.forward
        raise AttributeError(name)


http.server.ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler).serve_forever()
