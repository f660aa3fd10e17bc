// modelfs cache tier: the tier's own credentials for the origin (njs, Debian's
// libnginx-mod-http-js), set on every GET the fill stage (python -m modelfs.tierconf.fill)
// sends to the origin through nginx's origin side (nginx.conf).
import crypto from 'crypto';
import fs from 'fs';

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

export default {authorization, amzDate, amzContent, amzToken};
