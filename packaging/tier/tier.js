// modelfs cache tier: the fill stage (njs, Debian's libnginx-mod-http-js).
//
// nginx's proxy_cache + slice asks this stage for one slice of one pinned object version at
// a time, and only on a cache miss. It makes the one origin GET for that slice, computes the
// SHA-256 of the body it received, and answers with the origin's status and headers plus
//     X-Modelfs-Digest: sha256=<hex>; range=<first>-<last>
// which proxy_cache stores with the slice. modelfs checks every body it gets from the tier
// against that header, so a cached slice damaged afterwards (disk, memory, a proxy bug, a
// truncated cache file) is detected by the reader and read from the origin instead. The
// digest says what the tier received from the origin: it protects against a faulty replica,
// not a malicious one (docs/operations.md, "Cache tier").
import crypto from 'crypto';
import fs from 'fs';

// The headers of the origin's answer that the reader checks or that describe the bytes.
const PASS = ['Content-Range', 'Content-Type', 'ETag', 'Last-Modified', 'x-goog-generation',
              'x-goog-hash', 'x-goog-stored-content-length', 'x-goog-stored-content-encoding',
              'x-amz-version-id', 'Accept-Ranges'];

async function fill(r) {
    const reply = await r.subrequest('/.origin', {method: 'GET'});
    PASS.forEach((name) => {
        const value = reply.headersOut[name];
        if (value !== undefined) {
            r.headersOut[name] = value;
        }
    });
    const body = reply.responseBuffer || Buffer.alloc(0);
    if (reply.status === 200 || reply.status === 206) {
        let first = 0;
        let last = body.length - 1;
        const range = /^bytes (\d+)-(\d+)\//.exec(reply.headersOut['Content-Range'] || '');
        if (range) {
            first = Number(range[1]);
            last = Number(range[2]);
        }
        if (last - first + 1 !== body.length) {
            // A short body from the origin: never hand it to the cache.
            r.return(502, 'origin body does not match its Content-Range\n');
            return;
        }
        const digest = crypto.createHash('sha256').update(body).digest('hex');
        r.headersOut['X-Modelfs-Digest'] = `sha256=${digest}; range=${first}-${last}`;
    }
    r.return(reply.status, body);
}

// The tier's own credentials for the origin: "Bearer <token>" from the token file that a
// sidecar refreshes (GKE metadata server, gcloud), or nothing for anonymous origins.
function authorization(r) {
    const path = r.variables.tier_token_file;
    if (!path) {
        return '';
    }
    try {
        const token = fs.readFileSync(path, 'utf8').trim();
        return token ? `Bearer ${token}` : '';
    } catch (e) {
        return '';
    }
}

export default {fill, authorization};
