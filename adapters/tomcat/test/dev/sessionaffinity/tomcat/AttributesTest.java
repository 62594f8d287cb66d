package dev.sessionaffinity.tomcat;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.ObjectInputStream;
import java.io.ObjectOutputStream;
import java.io.Serializable;
import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.time.LocalDateTime;
import java.util.ArrayList;
import java.util.Date;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SortedMap;
import java.util.TreeMap;
import java.util.UUID;
import java.util.regex.Pattern;

import org.junit.Test;

import dev.sessionaffinity.tomcat.RestoreRefused.Reason;

public class AttributesTest {

    private static final ClassLoader LOADER = AttributesTest.class.getClassLoader();
    private static final Pattern APP = Attributes.allowList("dev\\.sessionaffinity\\.tomcat\\.AttributesTest\\$(?:Cart|Line)");
    private static final Pattern DEFAULT = Attributes.allowList("");

    /** An app object with a nested object that the app changes in place. */
    static final class Cart implements Serializable {
        private static final long serialVersionUID = 1L;
        final Map<String, Line> lines = new LinkedHashMap<>();
    }

    static final class Line implements Serializable {
        private static final long serialVersionUID = 1L;
        int quantity;
    }

    /** Stands in for a deserialization gadget: code runs in readObject. */
    static final class Gadget implements Serializable {
        private static final long serialVersionUID = 1L;
        static volatile boolean ran;

        private void readObject(ObjectInputStream in) throws IOException, ClassNotFoundException {
            in.defaultReadObject();
            ran = true;
        }
    }

    /** Serializable on the outside, not inside. */
    static final class Holder implements Serializable {
        private static final long serialVersionUID = 1L;
        final Object inside = new Object();
    }

    private static SortedMap<String, Object> attributes(Object... pairs) {
        SortedMap<String, Object> map = new TreeMap<>();
        for (int i = 0; i < pairs.length; i += 2) {
            map.put((String) pairs[i], pairs[i + 1]);
        }
        return map;
    }

    @Test
    public void attributesRoundTripWithTheAppsClassesAllowed() throws Exception {
        Cart cart = new Cart();
        cart.lines.put("apple", new Line());
        cart.lines.get("apple").quantity = 3;
        SortedMap<String, Object> values = attributes("cart", cart, "user", "ann", "visits", 7L,
                "price", new BigDecimal("9.99"), "tags", new ArrayList<>(List.of("a", "b")), "when", LocalDateTime.now(),
                "id", UUID.randomUUID(), "seen", new Date(), "codes", new int[] {1, 2}, "names", new String[] {"x"},
                "fixed", List.of(1, 2), "map", new HashMap<>(Map.of("k", 1)));
        Attributes.Written written = Attributes.write(values);
        assertEquals(List.of(), written.skipped);
        Map<String, Object> back = Attributes.read(written.bytes, LOADER, APP);
        assertEquals(values.keySet(), back.keySet());
        assertEquals(3, ((Cart) back.get("cart")).lines.get("apple").quantity);
        assertEquals(values.get("when"), back.get("when"));
        assertEquals(values.get("fixed"), back.get("fixed"));
        assertArrayEquals((int[]) values.get("codes"), (int[]) back.get("codes"));
    }

    @Test
    public void theSameAttributesGiveTheSameBytesAndAnInPlaceChangeDoesNot() throws Exception {
        Cart cart = new Cart();
        cart.lines.put("apple", new Line());
        SortedMap<String, Object> values = attributes("cart", cart, "user", "ann");
        byte[] first = Attributes.write(values).bytes;
        assertArrayEquals(first, Attributes.write(values).bytes);
        cart.lines.get("apple").quantity++;
        assertFalse(java.util.Arrays.equals(first, Attributes.write(values).bytes));
    }

    @Test
    public void attributesThatCannotBeSerializedAreLeftOutAndNamed() throws Exception {
        Attributes.Written written = Attributes.write(attributes("helper", new Object(), "holder", new Holder(), "user", "ann"));
        assertEquals(List.of("helper", "holder"), written.skipped);
        assertEquals(Map.of("user", "ann"), Attributes.read(written.bytes, LOADER, DEFAULT));
        assertEquals(-1, Attributes.size("holder", new Holder()));
        assertTrue(Attributes.size("user", "ann") > 0);
    }

    @Test
    public void aClassOutsideTheAllowListIsRefusedBeforeItsCodeRuns() throws Exception {
        Gadget.ran = false;
        for (Object attack : List.of(new Gadget(), new HashMap<>(Map.of("k", new Gadget())), new Gadget[] {new Gadget()})) {
            byte[] bytes = Attributes.write(attributes("a", attack)).bytes;
            RestoreRefused e = assertThrows(RestoreRefused.class, () -> Attributes.read(bytes, LOADER, APP));
            assertEquals(Reason.CLASS_NOT_ALLOWED, e.reason);
        }
        assertFalse("a refused class's readObject ran", Gadget.ran);
    }

    @Test
    public void theDefaultAllowListHasNoAppClasses() throws Exception {
        byte[] bytes = Attributes.write(attributes("cart", new Cart())).bytes;
        assertEquals(Reason.CLASS_NOT_ALLOWED, assertThrows(RestoreRefused.class, () -> Attributes.read(bytes, LOADER, DEFAULT)).reason);
        for (String name : List.of("java.net.URL", "java.util.PriorityQueue", "javax.management.BadAttributeValueExpException",
                "org.apache.commons.collections.functors.InvokerTransformer", "java.lang.reflect.Proxy", "java.lang.Object")) {
            assertFalse(name, DEFAULT.matcher(name).matches());
        }
    }

    @Test
    public void anArrayLongerThanTheStateIsRefusedWithoutAllocatingIt() throws Exception {
        ByteArrayOutputStream raw = new ByteArrayOutputStream();
        try (ObjectOutputStream out = new ObjectOutputStream(raw)) {
            out.writeInt(1);
            out.writeUTF("a");
            out.writeObject(new int[] {42});
        }
        byte[] bytes = raw.toByteArray();
        // The array length is the 4 bytes before the single element, at the end of the stream.
        ByteBuffer.wrap(bytes).putInt(bytes.length - 8, Integer.MAX_VALUE - 8);
        RestoreRefused e = assertThrows(RestoreRefused.class, () -> Attributes.read(bytes, LOADER, DEFAULT));
        assertNotEquals(null, e.reason);
    }

    @Test
    public void garbageIsMalformed() {
        RestoreRefused e = assertThrows(RestoreRefused.class, () -> Attributes.read(new byte[] {1, 2, 3}, LOADER, DEFAULT));
        assertEquals(Reason.MALFORMED, e.reason);
    }
}
