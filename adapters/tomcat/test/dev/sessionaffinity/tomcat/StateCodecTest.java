package dev.sessionaffinity.tomcat;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Base64;
import java.util.zip.DeflaterOutputStream;

import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

import org.junit.Test;

import dev.sessionaffinity.tomcat.RestoreRefused.Reason;

public class StateCodecTest {

    static final String SID = "AAAAAAAAAAAAAAAAAAAAAA";
    private static final String OTHER_SID = "BBBBBBBBBBBBBBBBBBBBBB";
    private static final long NOW = 1_800_000_000_000L;
    private static final byte[] ATTRIBUTES = "serialized attributes".getBytes(StandardCharsets.UTF_8);

    private final StateCodec codec = new StateCodec(StateKeys.parse(StateKeysTest.KEY_1, "test"));

    static SessionState state(String sid, long lastAccessed, int maxInactive, byte[] attributes) {
        return new SessionState(sid, "/shop", lastAccessed - 60_000, lastAccessed, maxInactive, attributes);
    }

    @Test
    public void aStateRoundTrips() throws Exception {
        String value = codec.encode(state(SID, NOW, 1800, ATTRIBUTES));
        assertTrue(value, value.matches("[A-Za-z0-9_-]+"));
        SessionState back = codec.decode(value, SID, "/shop", NOW + 1000);
        assertEquals(SID, back.sessionId);
        assertEquals("/shop", back.context);
        assertEquals(NOW - 60_000, back.creationTime);
        assertEquals(NOW, back.lastAccessedTime);
        assertEquals(1800, back.maxInactiveInterval);
        assertArrayEquals(ATTRIBUTES, back.attributes);
    }

    @Test
    public void theFormatIsTheDocumentedOne() throws Exception {
        // Built independently of the codec: version 1, encoding, body (stored or deflated), HMAC-SHA256, base64url.
        for (boolean deflated : new boolean[] {false, true}) {
            ByteArrayOutputStream signed = new ByteArrayOutputStream();
            signed.write(1);
            signed.write(deflated ? 1 : 0);
            OutputStream data = deflated ? new DeflaterOutputStream(signed) : signed;
            try (DataOutputStream body = new DataOutputStream(data)) {
                body.writeUTF(SID);
                body.writeUTF("/shop");
                body.writeLong(NOW - 5);
                body.writeLong(NOW);
                body.writeInt(60);
                body.writeInt(ATTRIBUTES.length);
                body.write(ATTRIBUTES);
            }
            SessionState back = codec.decode(sign(signed.toByteArray(), StateKeysTest.KEY_1), SID, "/shop", NOW);
            assertEquals(NOW - 5, back.creationTime);
            assertArrayEquals(ATTRIBUTES, back.attributes);
        }
    }

    @Test
    public void bigStatesAreDeflatedAndSmallOnesStored() throws Exception {
        byte[] big = new byte[4000]; // zeros: deflate shrinks them to almost nothing
        String value = codec.encode(state(SID, NOW, 1800, big));
        assertTrue(value.length() + " chars", value.length() < 200);
        assertEquals(1, Base64.getUrlDecoder().decode(value)[1]);
        assertArrayEquals(big, codec.decode(value, SID, "/shop", NOW).attributes);
        String small = codec.encode(state(SID, NOW, 1800, ATTRIBUTES));
        assertEquals(0, Base64.getUrlDecoder().decode(small)[1]);
    }

    @Test
    public void aKeyInTheRingVerifiesAfterRotation() throws Exception {
        String value = codec.encode(state(SID, NOW, 1800, ATTRIBUTES));
        StateCodec rotated = new StateCodec(StateKeys.parse(StateKeysTest.KEY_2 + " " + StateKeysTest.KEY_1, "test"));
        assertArrayEquals(ATTRIBUTES, rotated.decode(value, SID, "/shop", NOW).attributes);
    }

    @Test
    public void everyChangedByteIsRefused() {
        byte[] all = Base64.getUrlDecoder().decode(codec.encode(state(SID, NOW, 1800, ATTRIBUTES)));
        for (int i = 0; i < all.length; i++) {
            byte[] tampered = all.clone();
            tampered[i] ^= 0x20;
            assertRefused(Reason.SIGNATURE, Base64.getUrlEncoder().withoutPadding().encodeToString(tampered), SID);
        }
    }

    @Test
    public void unsignedStateIsRefused() {
        String demoBackendState = Base64.getUrlEncoder().withoutPadding()
                .encodeToString("{\"count\":3}".getBytes(StandardCharsets.UTF_8));
        assertRefused(Reason.MALFORMED, demoBackendState, SID); // too short to hold a MAC
        byte[] noMac = new byte[200];
        noMac[0] = 1; // a plausible version and encoding, and no MAC
        assertRefused(Reason.SIGNATURE, Base64.getUrlEncoder().encodeToString(noMac).replace("=", ""), SID);
        assertRefused(Reason.MALFORMED, "not base64!", SID);
        assertRefused(Reason.MALFORMED, "", SID);
    }

    @Test
    public void anotherKeyIsRefused() {
        String value = new StateCodec(StateKeys.parse(StateKeysTest.KEY_2, "test")).encode(state(SID, NOW, 1800, ATTRIBUTES));
        assertRefused(Reason.SIGNATURE, value, SID);
    }

    @Test
    public void aStateIsBoundToItsSessionAndWebApp() {
        String value = codec.encode(state(SID, NOW, 1800, ATTRIBUTES));
        assertRefused(Reason.OTHER_SESSION, value, OTHER_SID);
        RestoreRefused e = assertThrows(RestoreRefused.class, () -> codec.decode(value, SID, "/other", NOW));
        assertEquals(Reason.OTHER_SESSION, e.reason);
    }

    @Test
    public void anExpiredSessionIsRefused() throws Exception {
        String value = codec.encode(state(SID, NOW - 60_000, 60, ATTRIBUTES));
        assertRefused(Reason.EXPIRED, value, SID); // idle exactly 60 s: Tomcat expires it too
        codec.decode(value, SID, "/shop", NOW - 1); // 59.999 s: still valid
        String immortal = codec.encode(state(SID, 0, -1, ATTRIBUTES));
        codec.decode(immortal, SID, "/shop", NOW);
    }

    @Test
    public void aSignedStateThatInflatesPastTheCapIsRefused() throws Exception {
        ByteArrayOutputStream signed = new ByteArrayOutputStream();
        signed.write(1);
        signed.write(1);
        try (DataOutputStream body = new DataOutputStream(new DeflaterOutputStream(signed))) {
            body.writeUTF(SID);
            body.writeUTF("/shop");
            body.writeLong(NOW);
            body.writeLong(NOW);
            body.writeInt(60);
            body.writeInt(StateCodec.MAX_ATTRIBUTE_BYTES);
            body.write(new byte[StateCodec.MAX_ATTRIBUTE_BYTES + 512 * 1024]); // zeros: a few KB deflated
        }
        String bomb = sign(signed.toByteArray(), StateKeysTest.KEY_1);
        assertTrue("the bomb is small: " + bomb.length(), bomb.length() < 8192);
        assertRefused(Reason.MALFORMED, bomb, SID);
    }

    private void assertRefused(Reason reason, String value, String sid) {
        RestoreRefused e = assertThrows(RestoreRefused.class, () -> codec.decode(value, sid, "/shop", NOW));
        assertEquals(e.getMessage(), reason, e.reason);
    }

    private static String sign(byte[] signed, String key) throws Exception {
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(key.getBytes(StandardCharsets.UTF_8), "HmacSHA256"));
        byte[] tag = mac.doFinal(signed);
        byte[] all = Arrays.copyOf(signed, signed.length + tag.length);
        System.arraycopy(tag, 0, all, signed.length, tag.length);
        return Base64.getUrlEncoder().withoutPadding().encodeToString(all);
    }
}
