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
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.zip.Deflater;
import java.util.zip.DeflaterOutputStream;
import java.util.zip.InflaterInputStream;

import dev.sessionaffinity.tomcat.RestoreRefused.Reason;

/**
 * The x-session-state format, version 1:
 *
 * <pre>
 * base64url( 0x01 || encoding || data || HMAC-SHA256(key, 0x01 || encoding || data) )
 * encoding = 0: data is the body; 1: data is deflate(body), used when that is smaller
 * body = sessionId, binding (UTF), creationTime, lastAccessedTime (long),
 *        maxInactiveInterval (int), attributes (int length + bytes)
 * binding = the virtual host's name, the context path, and "#" appId if one is set
 * lastAccessedTime = when the state was issued (the valve writes each one fresh)
 * </pre>
 *
 * <p>Small bodies are stored as they are: setting up a deflate stream costs
 * more than it saves on a few hundred bytes.
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
    private static final byte STORED = 0;
    private static final byte DEFLATED = 1;
    /** Bodies up to this size are stored, not deflated. */
    private static final int DEFLATE_ABOVE = 512;
    private static final int HEADER = 2;

    private static final int POOLED_DEFLATERS = Math.max(2, 2 * Runtime.getRuntime().availableProcessors());
    private static final Base64.Encoder BASE64URL = Base64.getUrlEncoder().withoutPadding();
    private static final Base64.Decoder BASE64URL_DECODER = Base64.getUrlDecoder();

    private final StateKeys keys;
    /**
     * Reused deflaters: setting one up costs more than compressing a typical
     * state. Bounded, so idle ones hold little native memory (about 256 KiB each).
     */
    private final BlockingQueue<Deflater> deflaters = new ArrayBlockingQueue<>(POOLED_DEFLATERS);

    StateCodec(StateKeys keys) {
        this.keys = keys;
    }

    /** The header value for state; callers keep attributes within {@link #MAX_ATTRIBUTE_BYTES}. */
    String encode(SessionState state) {
        ByteArrayOutputStream body = new ByteArrayOutputStream(64 + state.attributes.length);
        try (DataOutputStream out = new DataOutputStream(body)) {
            out.writeUTF(state.sessionId);
            out.writeUTF(state.context);
            out.writeLong(state.creationTime);
            out.writeLong(state.lastAccessedTime);
            out.writeInt(state.maxInactiveInterval);
            out.writeInt(state.attributes.length);
            out.write(state.attributes);
        } catch (IOException e) {
            throw new UncheckedIOException("writing to memory failed", e);
        }
        byte[] raw = body.toByteArray();
        byte[] deflated = raw.length > DEFLATE_ABOVE ? deflate(raw) : raw;
        boolean smaller = deflated.length < raw.length;
        byte[] data = smaller ? deflated : raw;
        byte[] all = new byte[HEADER + data.length + StateKeys.MAC_LENGTH];
        all[0] = VERSION;
        all[1] = smaller ? DEFLATED : STORED;
        System.arraycopy(data, 0, all, HEADER, data.length);
        byte[] mac = keys.sign(all, HEADER + data.length);
        System.arraycopy(mac, 0, all, HEADER + data.length, mac.length);
        return BASE64URL.encodeToString(all);
    }

    private byte[] deflate(byte[] raw) {
        Deflater deflater = deflaters.poll();
        if (deflater == null) {
            deflater = new Deflater();
        }
        try {
            ByteArrayOutputStream out = new ByteArrayOutputStream(raw.length / 2 + 64);
            try (DeflaterOutputStream stream = new DeflaterOutputStream(out, deflater, 1024)) {
                stream.write(raw);
            }
            return out.toByteArray();
        } catch (IOException e) {
            throw new UncheckedIOException("deflating in memory failed", e);
        } finally {
            deflater.reset();
            if (!deflaters.offer(deflater)) {
                deflater.end();
            }
        }
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
        if (signedLength < HEADER + 1) {
            throw new RestoreRefused(Reason.MALFORMED, "too short (" + all.length + " bytes)");
        }
        if (!keys.verify(all, signedLength, Arrays.copyOfRange(all, signedLength, all.length))) {
            throw new RestoreRefused(Reason.SIGNATURE, "no key verifies its signature");
        }
        if (all[0] != VERSION || (all[1] != STORED && all[1] != DEFLATED)) {
            throw new RestoreRefused(Reason.MALFORMED, "unknown version " + all[0] + " or encoding " + all[1]);
        }
        InputStream data = new ByteArrayInputStream(all, HEADER, signedLength - HEADER);
        SessionState state = readBody(all[1] == DEFLATED ? new Capped(new InflaterInputStream(data), MAX_BODY_BYTES) : data);
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

    private static SessionState readBody(InputStream data) throws RestoreRefused {
        try (DataInputStream body = new DataInputStream(data)) {
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
