package dev.sessionaffinity.tomcat;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;

import org.junit.Test;

public class StateKeysTest {

    static final String KEY_1 = "first-test-key-0123456789abcdefghijklmnop";
    static final String KEY_2 = "second-test-key-0123456789abcdefghijklmno";
    private static final byte[] DATA = "some state".getBytes(StandardCharsets.UTF_8);

    @Test
    public void theFirstKeySignsAndEveryKeyVerifies() {
        StateKeys old = StateKeys.parse(KEY_1, "test");
        StateKeys rotated = StateKeys.parse(KEY_2 + ",\n " + KEY_1, "test");
        assertTrue(rotated.verify(DATA, DATA.length, old.sign(DATA, DATA.length)));
        assertTrue(rotated.verify(DATA, DATA.length, rotated.sign(DATA, DATA.length)));
        assertFalse(old.verify(DATA, DATA.length, rotated.sign(DATA, DATA.length)));
    }

    @Test
    public void aVerifyOnlyKeyVerifiesButNeverSigns() {
        StateKeys phase1 = StateKeys.parse(KEY_1 + " verify:" + KEY_2, "test");
        StateKeys phase2 = StateKeys.parse(KEY_2 + " " + KEY_1, "test");
        assertArrayEquals(StateKeys.parse(KEY_1, "t").sign(DATA, DATA.length), phase1.sign(DATA, DATA.length));
        assertTrue(phase1.verify(DATA, DATA.length, phase2.sign(DATA, DATA.length)));
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> StateKeys.parse("verify:" + KEY_1, "keyFile /k"));
        assertEquals("keyFile /k: holds no signing key (every key is marked verify:)", e.getMessage());
    }

    @Test
    public void aMacOfOtherDataDoesNotVerify() {
        StateKeys keys = StateKeys.parse(KEY_1, "test");
        byte[] mac = keys.sign(DATA, DATA.length);
        assertFalse(keys.verify(DATA, DATA.length - 1, mac));
        mac[0] ^= 1;
        assertFalse(keys.verify(DATA, DATA.length, mac));
    }

    @Test
    public void shortKeysAreRefusedWithoutShowingThem() {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> StateKeys.parse(KEY_1 + " short-secret-key", "keyFile /k"));
        assertTrue(e.getMessage(), e.getMessage().contains("keyFile /k: key 2 has 16 characters; use at least 32"));
        assertFalse(e.getMessage().contains("short-secret-key"));
    }

    @Test
    public void anEmptySourceIsRefused() {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> StateKeys.parse(" \n,", "x"));
        assertTrue(e.getMessage(), e.getMessage().contains("holds no key"));
    }

    @Test
    public void keysComeFromTheEnvironmentVariableNamedByKeyEnvironment() {
        StateKeys keys = StateKeys.load("", "MY_KEYS", Map.of("MY_KEYS", KEY_1));
        assertArrayEquals(StateKeys.parse(KEY_1, "x").sign(DATA, DATA.length), keys.sign(DATA, DATA.length));
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> StateKeys.load(null, "MY_KEYS", Map.of()));
        assertTrue(e.getMessage(), e.getMessage().startsWith("keyEnvironment: the environment variable MY_KEYS is not set"));
    }

    @Test
    public void aKeyFileWinsOverTheEnvironment() throws Exception {
        Path file = Files.createTempFile("keys", ".txt");
        try {
            Files.writeString(file, KEY_2 + "\n");
            StateKeys keys = StateKeys.load(file.toString(), "MY_KEYS", Map.of("MY_KEYS", KEY_1));
            assertArrayEquals(StateKeys.parse(KEY_2, "x").sign(DATA, DATA.length), keys.sign(DATA, DATA.length));
        } finally {
            Files.delete(file);
        }
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> StateKeys.load(file.toString(), "MY_KEYS", Map.of()));
        assertTrue(e.getMessage(), e.getMessage().startsWith("keyFile: cannot read " + file));
    }
}
