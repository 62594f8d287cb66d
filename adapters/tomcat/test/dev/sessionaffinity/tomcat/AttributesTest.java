package dev.sessionaffinity.tomcat;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.IOException;
import java.io.ObjectInputFilter;
import java.io.ObjectInputStream;
import java.io.Serializable;
import java.math.BigDecimal;
import java.net.URI;
import java.nio.ByteBuffer;
import java.sql.Timestamp;
import java.time.LocalDateTime;
import java.util.ArrayList;
import java.util.Date;
import java.util.EnumMap;
import java.util.EnumSet;
import java.util.GregorianCalendar;
import java.util.HashMap;
import java.util.Hashtable;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.SortedMap;
import java.util.TreeMap;
import java.util.UUID;
import java.util.Vector;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentSkipListMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.regex.Pattern;

import org.junit.Test;

import dev.sessionaffinity.tomcat.RestoreRefused.Reason;

public class AttributesTest {

    private static final ClassLoader LOADER = AttributesTest.class.getClassLoader();
    private static final Pattern APP = Attributes.allowList("dev\\.sessionaffinity\\.tomcat\\.AttributesTest\\$(?:Cart|Line|Role)");
    private static final Pattern DEFAULT = Attributes.allowList("");
    /** Writes anything: stands for a pod configured differently, or for a forger who got past the signature. */
    private static final Pattern ANYTHING = Pattern.compile(".*");

    enum Role { USER, ADMIN }

    /** Allowed by the valve's patterns; the JVM-wide filter of one test rejects it. */
    static final class Banned implements Serializable {
        private static final long serialVersionUID = 1L;
    }

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
        Attributes.Written written = Attributes.write(values, APP);
        assertEquals(Map.of(), written.skipped);
        Map<String, Object> back = read(written.bytes, APP).values;
        assertEquals(values.keySet(), back.keySet());
        assertEquals(3, ((Cart) back.get("cart")).lines.get("apple").quantity);
        assertEquals(values.get("when"), back.get("when"));
        assertEquals(values.get("fixed"), back.get("fixed"));
        assertArrayEquals((int[]) values.get("codes"), (int[]) back.get("codes"));
    }

    /** What real apps keep in sessions: Spring Security's saved request, JDK concurrent types, calendars. */
    @Test
    public void commonJdkTypesRoundTripWithTheDefaults() throws Exception {
        TreeMap<String, List<String>> headers = new TreeMap<>(String.CASE_INSENSITIVE_ORDER);
        headers.put("Accept", new ArrayList<>(List.of("text/html")));
        GregorianCalendar calendar = new GregorianCalendar(2026, 11, 7);
        SortedMap<String, Object> values = attributes("savedRequestHeaders", headers,
                "counts", new ConcurrentHashMap<>(Map.of("a", 1)), "hits", new AtomicInteger(5), "bytes", new AtomicLong(6),
                "flag", new AtomicBoolean(true), "listeners", new CopyOnWriteArrayList<>(List.of("x")),
                "days", EnumSet.of(Role.USER, Role.ADMIN), "byRole", new EnumMap<>(Map.of(Role.USER, 1)),
                "old", new Vector<>(List.of(1)), "calendar", calendar, "stamp", new Timestamp(1_700_000_000_123L),
                "uri", new URI("https://example.com/a?b=c"), "row", new Object[] {"a", 1, null},
                "sorted", new ConcurrentSkipListMap<>(Map.of("k", "v")), "table", new Hashtable<>(Map.of("k", "v")));
        Attributes.Written written = Attributes.write(values, APP);
        assertEquals(Map.of(), written.skipped);
        Attributes.Read back = read(written.bytes, APP);
        assertEquals(Map.of(), back.refused);
        @SuppressWarnings("unchecked")
        TreeMap<String, List<String>> savedHeaders = (TreeMap<String, List<String>>) back.values.get("savedRequestHeaders");
        assertEquals("the comparator came back", List.of("text/html"), savedHeaders.get("ACCEPT"));
        assertEquals(5, ((AtomicInteger) back.values.get("hits")).get());
        assertEquals(EnumSet.of(Role.USER, Role.ADMIN), back.values.get("days"));
        assertEquals(calendar, back.values.get("calendar"));
        assertEquals(values.get("stamp"), back.values.get("stamp"));
        assertArrayEquals((Object[]) values.get("row"), (Object[]) back.values.get("row"));
        for (String name : List.of("counts", "listeners", "byRole", "old", "uri", "sorted", "table")) {
            assertEquals(name, values.get(name), back.values.get(name));
        }
    }

    @Test
    public void theSameAttributesGiveTheSameBytesAndAnInPlaceChangeDoesNot() throws Exception {
        Cart cart = new Cart();
        cart.lines.put("apple", new Line());
        SortedMap<String, Object> values = attributes("cart", cart, "user", "ann");
        byte[] first = Attributes.write(values, APP).bytes;
        assertArrayEquals(first, Attributes.write(values, APP).bytes);
        cart.lines.get("apple").quantity++;
        assertFalse(java.util.Arrays.equals(first, Attributes.write(values, APP).bytes));
    }

    @Test
    public void attributesThatCannotBeSerializedAreLeftOutAndNamed() throws Exception {
        Attributes.Written written = Attributes.write(attributes("helper", new Object(), "holder", new Holder(), "user", "ann"), APP);
        assertEquals(List.of("helper", "holder"), List.copyOf(written.skipped.keySet()));
        assertTrue(written.skipped.get("holder"), written.skipped.get("holder").contains("java.lang.Object"));
        assertEquals(Map.of("user", "ann"), read(written.bytes, DEFAULT).values);
        assertEquals(Set.of("user"), written.sizes.keySet());
    }

    @Test
    public void anAttributeHoldingAClassOutsideTheAllowListIsLeftOutWhenWritten() throws Exception {
        Attributes.Written written = Attributes.write(attributes("cart", new Cart(), "saved", new HashMap<>(Map.of("k", new Gadget())),
                "user", "ann"), APP);
        assertEquals(List.of("saved"), List.copyOf(written.skipped.keySet()));
        assertTrue(written.skipped.get("saved"), written.skipped.get("saved").contains(Gadget.class.getName()));
        assertEquals(Set.of("cart", "user"), read(written.bytes, APP).values.keySet());
    }

    @Test
    public void aClassOutsideTheAllowListIsRefusedBeforeItsCodeRunsAndTheOtherAttributesSurvive() throws Exception {
        Gadget.ran = false;
        for (Object attack : List.of(new Gadget(), new HashMap<>(Map.of("k", new Gadget())), new Gadget[] {new Gadget()})) {
            // Written by a pod whose allow-list differs (or a forged state that got past the signature).
            byte[] bytes = Attributes.write(attributes("a", attack, "user", "ann"), ANYTHING).bytes;
            Attributes.Read back = read(bytes, APP);
            assertEquals(Map.of("user", "ann"), back.values);
            assertEquals(Set.of("a"), back.refused.keySet());
            assertTrue(back.refused.get("a"), back.refused.get("a").contains(Gadget.class.getName()));
        }
        assertFalse("a refused class's readObject ran", Gadget.ran);
    }

    @Test
    public void theDefaultAllowListHasNoAppClassesAndNoGadgets() throws Exception {
        byte[] bytes = Attributes.write(attributes("cart", new Cart()), ANYTHING).bytes;
        assertEquals(Set.of("cart"), read(bytes, DEFAULT).refused.keySet());
        for (String name : Attributes.GADGETS) {
            assertFalse(name, DEFAULT.matcher(name).matches());
        }
    }

    @Test
    public void anAllowListLettingInAGadgetIsRefusedAtStart() {
        for (String pattern : List.of(".*", "java\\..*", "org\\.apache\\.commons\\..*", "com\\.example\\..*|java\\.net\\..*")) {
            IllegalArgumentException e = assertThrows(pattern, IllegalArgumentException.class, () -> Attributes.allowList(pattern));
            assertTrue(e.getMessage(), e.getMessage().startsWith("allowedClasses: "));
        }
        Attributes.allowList("com\\.example\\.shop\\..*");
    }

    @Test
    public void aGraphDeeperThanTheLimitIsLeftOut() throws Exception {
        List<Object> deep = new ArrayList<>();
        List<Object> inner = deep;
        for (int i = 0; i < Attributes.MAX_DEPTH + 10; i++) {
            List<Object> next = new ArrayList<>();
            inner.add(next);
            inner = next;
        }
        byte[] bytes = Attributes.write(attributes("deep", deep, "user", "ann"), APP).bytes;
        Attributes.Read back = read(bytes, APP);
        assertEquals(Map.of("user", "ann"), back.values);
        assertEquals(Set.of("deep"), back.refused.keySet());
    }

    @Test
    public void theJvmWideSerialFilterStillApplies() throws Exception {
        // jdk.serialFilter: set once for this JVM; it rejects one class the allow-list would let in.
        ObjectInputFilter.Config.setSerialFilter(ObjectInputFilter.Config.createFilter("!" + Banned.class.getName()));
        byte[] bytes = Attributes.write(attributes("banned", new Banned(), "user", "ann"), Pattern.compile(".*")).bytes;
        Attributes.Read back = read(bytes, Pattern.compile(".*"));
        assertEquals(Map.of("user", "ann"), back.values);
        assertEquals(Set.of("banned"), back.refused.keySet());
    }

    @Test
    public void anArrayLongerThanTheStateIsRefusedWithoutAllocatingIt() throws Exception {
        byte[] bytes = Attributes.write(attributes("a", new int[] {42}), DEFAULT).bytes;
        // The array length is the 4 bytes before the single element, at the end of the stream.
        ByteBuffer.wrap(bytes).putInt(bytes.length - 8, Integer.MAX_VALUE - 8);
        assertEquals(Set.of("a"), read(bytes, DEFAULT).refused.keySet());
    }

    @Test
    public void garbageIsMalformed() {
        for (byte[] garbage : List.of(new byte[] {1, 2, 3}, new byte[] {0, 0, 0, 1, 0, 1, 'a', 0x7f, 0, 0, 0})) {
            RestoreRefused e = assertThrows(RestoreRefused.class, () -> read(garbage, DEFAULT));
            assertEquals(Reason.MALFORMED, e.reason);
        }
    }

    private static Attributes.Read read(byte[] bytes, Pattern allowed) throws RestoreRefused {
        return Attributes.read(bytes, LOADER, allowed);
    }
}
