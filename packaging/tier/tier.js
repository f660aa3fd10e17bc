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

// The tier's own credentials for the origin, read from $tier_token_file on each miss (a
// sidecar keeps the file current), per $tier_auth:
//   bearer     "Bearer <file contents>" (GCS: an OAuth access token)
//   aws-sigv4  the file holds "ACCESS_KEY_ID SECRET_ACCESS_KEY [SESSION_TOKEN]"; the GET is
//              signed with AWS Signature Version 4 for $tier_aws_region (S3)
// No file, an empty one, or no mode: nothing is sent (anonymous origins).
function secret(r) {
    const path = r.variables.tier_token_file;
    if (!path) {
        return '';
    }
    try {
        return fs.readFileSync(path, 'utf8').trim();
    } catch (e) {
        return '';
    }
}

function amzDate(r) {
    if (r.variables.tier_auth !== 'aws-sigv4') {
        return '';
    }
    return new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
}

function amzContent(r) {
    return r.variables.tier_auth === 'aws-sigv4' ? 'UNSIGNED-PAYLOAD' : '';
}

function amzToken(r) {
    if (r.variables.tier_auth !== 'aws-sigv4') {
        return '';
    }
    return secret(r).split(/\s+/)[2] || '';
}

function hmac(key, text) {
    return crypto.createHmac('sha256', key).update(text).digest();
}

function sigv4(r, keys) {
    const parts = keys.split(/\s+/);
    if (parts.length < 2) {
        return '';
    }
    const date = r.variables.tier_amz_date;  // the value sent as x-amz-date (cached per request)
    const day = date.slice(0, 8);
    const region = r.variables.tier_aws_region;
    const scope = `${day}/${region}/s3/aws4_request`;
    const uri = r.variables.request_uri;
    const q = uri.indexOf('?');
    const path = q < 0 ? uri : uri.slice(0, q);
    const query = q < 0 ? '' : uri.slice(q + 1).split('&').filter((x) => x).map(
        (x) => (x.indexOf('=') < 0 ? x + '=' : x)).sort().join('&');
    const token = parts[2] || '';
    let headers = `host:${r.variables.tier_origin_host}\nx-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:${date}\n`;
    let signed = 'host;x-amz-content-sha256;x-amz-date';
    if (token) {
        headers += `x-amz-security-token:${token}\n`;
        signed += ';x-amz-security-token';
    }
    const request = ['GET', path, query, headers, signed, 'UNSIGNED-PAYLOAD'].join('\n');
    const toSign = ['AWS4-HMAC-SHA256', date, scope,
                    crypto.createHash('sha256').update(request).digest('hex')].join('\n');
    let key = hmac('AWS4' + parts[1], day);
    key = hmac(key, region);
    key = hmac(key, 's3');
    key = hmac(key, 'aws4_request');
    const signature = crypto.createHmac('sha256', key).update(toSign).digest('hex');
    return `AWS4-HMAC-SHA256 Credential=${parts[0]}/${scope}, SignedHeaders=${signed}, Signature=${signature}`;
}

function authorization(r) {
    const mode = r.variables.tier_auth;
    const value = mode ? secret(r) : '';
    if (!value) {
        return '';
    }
    if (mode === 'aws-sigv4') {
        return sigv4(r, value);
    }
    return `Bearer ${value}`;
}

export default {fill, authorization, amzDate, amzContent, amzToken};
