package dev.sessionaffinity.tomcat;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.util.Arrays;
import java.util.Base64;
import java.util.zip.Deflater;
import java.util.zip.DeflaterOutputStream;
import java.util.zip.InflaterInputStream;

import dev.sessionaffinity.tomcat.RestoreRefused.Reason;

/**
 * The x-session-state format, version 1:
 *
 * <pre>
 * base64url( 0x01 || deflate(body) || HMAC-SHA256(key, 0x01 || deflate(body)) )
 * body = sessionId, context (UTF), creationTime, lastAccessedTime (long),
 *        maxInactiveInterval (int), attributes (int length + bytes)
 * </pre>
 *
 * <p>Decoding checks, in this order, so nothing unauthenticated is inflated or
 * deserialized: format, signature, size after inflating, binding to the
 * session id and web app, expiry. The attributes are deserialized later, by
 * {@link Attributes}, with a class allow-list.
 */
final class StateCodec {

    static final byte VERSION = 1;
    /** The most attribute bytes a state may hold; callers of encode keep to it, decode refuses more. */
    static final int MAX_ATTRIBUTE_BYTES = 1 << 20;
    /** The largest body encode can produce: two UTF strings, the metadata and the attributes. */
    private static final int MAX_BODY_BYTES = MAX_ATTRIBUTE_BYTES + 2 * (2 + 65535) + 3 * 8;

    private static final Base64.Encoder BASE64URL = Base64.getUrlEncoder().withoutPadding();
    private static final Base64.Decoder BASE64URL_DECODER = Base64.getUrlDecoder();

    private final StateKeys keys;

    StateCodec(StateKeys keys) {
        this.keys = keys;
    }

    /** The header value for state; callers keep attributes within {@link #MAX_ATTRIBUTE_BYTES}. */
    String encode(SessionState state) {
        ByteArrayOutputStream envelope = new ByteArrayOutputStream(256 + state.attributes.length / 2);
        envelope.write(VERSION);
        Deflater deflater = new Deflater();
        try (DataOutputStream body = new DataOutputStream(new DeflaterOutputStream(envelope, deflater, 1024))) {
            body.writeUTF(state.sessionId);
            body.writeUTF(state.context);
            body.writeLong(state.creationTime);
            body.writeLong(state.lastAccessedTime);
            body.writeInt(state.maxInactiveInterval);
            body.writeInt(state.attributes.length);
            body.write(state.attributes);
        } catch (IOException e) {
            throw new UncheckedIOException("writing to memory failed", e);
        } finally {
            deflater.end();
        }
        byte[] signed = envelope.toByteArray();
        byte[] mac = keys.sign(signed, signed.length);
        byte[] all = Arrays.copyOf(signed, signed.length + mac.length);
        System.arraycopy(mac, 0, all, signed.length, mac.length);
        return BASE64URL.encodeToString(all);
    }

    /**
     * The state in value, if it is authentic, made for sessionId in context,
     * and not expired at time now.
     */
    SessionState decode(String value, String sessionId, String context, long now) throws RestoreRefused {
        byte[] all;
        try {
            all = BASE64URL_DECODER.decode(value);
        } catch (IllegalArgumentException e) {
            throw new RestoreRefused(Reason.MALFORMED, "not base64url");
        }
        int signedLength = all.length - StateKeys.MAC_LENGTH;
        if (signedLength < 2) {
            throw new RestoreRefused(Reason.MALFORMED, "too short (" + all.length + " bytes)");
        }
        if (!keys.verify(all, signedLength, Arrays.copyOfRange(all, signedLength, all.length))) {
            throw new RestoreRefused(Reason.SIGNATURE, "no key verifies its signature");
        }
        if (all[0] != VERSION) {
            throw new RestoreRefused(Reason.MALFORMED, "unknown version " + all[0]);
        }
        SessionState state = readBody(new ByteArrayInputStream(all, 1, signedLength - 1));
        if (!state.sessionId.equals(sessionId)) {
            throw new RestoreRefused(Reason.OTHER_SESSION, "made for another session id");
        }
        if (!state.context.equals(context)) {
            throw new RestoreRefused(Reason.OTHER_SESSION, "made by web app '" + state.context + "'");
        }
        if (state.expiredAt(now)) {
            throw new RestoreRefused(Reason.EXPIRED, "idle " + (now - state.lastAccessedTime) / 1000
                    + " s, max inactive interval " + state.maxInactiveInterval + " s");
        }
        return state;
    }

    private static SessionState readBody(InputStream deflated) throws RestoreRefused {
        try (DataInputStream body = new DataInputStream(new Capped(new InflaterInputStream(deflated), MAX_BODY_BYTES))) {
            String sessionId = body.readUTF();
            String context = body.readUTF();
            long creationTime = body.readLong();
            long lastAccessedTime = body.readLong();
            int maxInactiveInterval = body.readInt();
            int length = body.readInt();
            if (length < 0 || length > MAX_ATTRIBUTE_BYTES) {
                throw new RestoreRefused(Reason.MALFORMED, "attribute length " + length);
            }
            byte[] attributes = body.readNBytes(length);
            if (attributes.length != length || body.read() != -1) {
                throw new RestoreRefused(Reason.MALFORMED, "body length does not match");
            }
            return new SessionState(sessionId, context, creationTime, lastAccessedTime, maxInactiveInterval, attributes);
        } catch (IOException e) {
            throw new RestoreRefused(Reason.MALFORMED, "body: " + e.getClass().getSimpleName());
        }
    }

    /** Fails a read past limit bytes, so a small state cannot inflate into a large allocation. */
    private static final class Capped extends InputStream {
        private final InputStream in;
        private long left;

        Capped(InputStream in, long limit) {
            this.in = in;
            this.left = limit;
        }

        @Override
        public int read() throws IOException {
            int b = in.read();
            if (b >= 0 && --left < 0) {
                throw new IOException("inflates past " + MAX_BODY_BYTES + " bytes");
            }
            return b;
        }

        @Override
        public int read(byte[] buffer, int offset, int length) throws IOException {
            int n = in.read(buffer, offset, length);
            if (n > 0 && (left -= n) < 0) {
                throw new IOException("inflates past " + MAX_BODY_BYTES + " bytes");
            }
            return n;
        }

        @Override
        public void close() throws IOException {
            in.close();
        }
    }
}
